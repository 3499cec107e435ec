"""Memory savers: fp8 weight storage, block swap, attention backend choice."""
