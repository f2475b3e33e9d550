"""Request handlers, one module per surface: speech delivery, admin, health."""
