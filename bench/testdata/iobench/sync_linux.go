package main

import (
	"os"

	"golang.org/x/sys/unix"
)

func syncAll() { unix.Sync() }

func fdatasync(f *os.File) error { return unix.Fdatasync(int(f.Fd())) }
