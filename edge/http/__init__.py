"""HTTP semantics: pure Range and precondition logic, and the delivery of cached bodies."""
