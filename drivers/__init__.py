"""Device drivers: pure decoders, thin I/O shells and emulators that behave like the chips."""
