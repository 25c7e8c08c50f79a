//go:build !unix

package relay

import "os"

func removeFile(p string) error { return os.Remove(p) }

func renameFile(from, to string) error { return os.Rename(from, to) }
