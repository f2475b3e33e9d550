"""The edge's cache: a size-bounded disk store, an in-memory hot tier in front of it,
and a bounded-memory counter of the most requested keys."""
