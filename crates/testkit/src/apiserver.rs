//! A fake Kubernetes API server speaking the real HTTP protocol.
