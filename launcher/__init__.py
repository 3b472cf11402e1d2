"""meshplan launcher: launch artifacts from a plan, the supervisor and the runtime hook."""
