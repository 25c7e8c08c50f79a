//go:build !unix

package relay

import "errors"

// readFromFD is never called here: rawConn is nil, so a spareReader reads
// every connection straight into the caller's buffer.
func (r *spareReader) readFromFD(fd uintptr) bool {
	r.err = errors.ErrUnsupported
	return true
}

func readErr(n int, err error) error { return err }
