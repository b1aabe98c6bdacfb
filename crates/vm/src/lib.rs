//! VM runtime (in progress).
