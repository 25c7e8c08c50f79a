//go:build !unix

package relay

import "errors"

// canWaitFD: here a spareReader reads every connection straight into the
// caller's buffer.
const canWaitFD = false

func (r *spareReader) readFromFD(fd uintptr) bool {
	r.err = errors.ErrUnsupported
	return true
}

func readErr(n int, err error) error { return err }
