"""Network drivers: each builds one kind of dataplane behind the `NetworkDriver` interface."""
