"""One module per backported upstream change; each defines PATCH (see sgl_accel._registry)."""
