//go:build unix

package relay

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// tryWritev writes what the connection takes without waiting and returns
// the rest.
func tryWritev(c net.Conn, bufs net.Buffers) (rest net.Buffers, err error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return bufs, nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	rest = bufs
	var werr error
	err = rc.Write(func(fd uintptr) bool {
		for len(rest) > 0 {
			n, e := unix.Writev(int(fd), rest[:min(len(rest), 1024)])
			if n > 0 {
				rest = advance(rest, n)
			}
			switch e {
			case nil:
			case unix.EINTR:
			case unix.EAGAIN:
				return true // full: the rest is the caller's
			default:
				werr = e
				return true
			}
		}
		return true
	})
	if err == nil {
		err = werr
	}
	return rest, err
}
