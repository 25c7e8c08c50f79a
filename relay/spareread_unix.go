//go:build unix

package relay

import (
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// readFromFD is the spareReader's raw read: it takes a chunk and reads
// what is there into it, or, when nothing is, gives the chunk back and
// has the connection wait for readability (false).
func (r *spareReader) readFromFD(fd uintptr) bool {
	if r.chunk == nil {
		r.chunk = readChunks.Get().(*[]byte)
	}
	for {
		n, err := unix.Read(int(fd), *r.chunk)
		switch err {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			r.dropChunk()
			return false
		}
		r.n, r.err = max(n, 0), err
		return true
	}
}

// readErr is the error of a raw read that got n bytes and err.
func readErr(n int, err error) error {
	if err != nil {
		return os.NewSyscallError("read", err)
	}
	return io.EOF
}
