//go:build !linux

package main

// limitCapabilities does nothing where there are no Linux capabilities.
func limitCapabilities(needs []capNeed) (kept, dropped string, err error) { return "", "", nil }
