//go:build unix

package relay

import (
	"os"

	"golang.org/x/sys/unix"
)

// removeFile removes the file p with one unlink. os.Remove also tries
// rmdir when unlink fails, a second system call for a file that is not
// there, the common case of an output's info file.
func removeFile(p string) error {
	for {
		err := unix.Unlink(p)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.PathError{Op: "remove", Path: p, Err: err}
		}
		return nil
	}
}

// renameFile renames the file from onto to with one rename. os.Rename
// first checks with lstat that to is no folder; rename(2) of a file onto
// a folder fails by itself.
func renameFile(from, to string) error {
	for {
		err := unix.Rename(from, to)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
		}
		return nil
	}
}
