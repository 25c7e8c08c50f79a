//go:build unix

package relay

import (
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// writevState is a writer's non-blocking writev, kept in its pooled
// scratch so that a write allocates nothing: the iovec array, and the
// callback for the connection's RawConn.Write made once.
type writevState struct {
	iov  []unix.Iovec
	rest net.Buffers
	err  error
	fn   func(fd uintptr) bool
}

// tryWritev writes what the connection (a plain TCP connection's RawConn)
// takes without waiting and returns the rest.
func tryWritev(rc syscall.RawConn, st *writevState, bufs net.Buffers) (rest net.Buffers, err error) {
	if rc == nil {
		return bufs, nil
	}
	if st.fn == nil {
		st.fn = st.write
	}
	st.rest, st.err = bufs, nil
	err = rc.Write(st.fn)
	rest, st.rest = st.rest, nil
	if err == nil {
		err = st.err
	}
	clear(st.iov)
	st.iov = st.iov[:0]
	return rest, err
}

// write is the RawConn.Write callback: writev until done, full or failed.
func (st *writevState) write(fd uintptr) bool {
	for len(st.rest) > 0 {
		iov := st.iov[:0]
		for _, b := range st.rest[:min(len(st.rest), 1024)] {
			if len(b) == 0 {
				continue
			}
			v := unix.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			iov = append(iov, v)
		}
		st.iov = iov
		if len(iov) == 0 {
			st.rest = nil
			return true
		}
		r, _, e := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
		if n := int(r); e == 0 && n > 0 {
			st.rest = advance(st.rest, n)
		}
		switch e {
		case 0:
		case unix.EINTR:
		case unix.EAGAIN:
			return true // full: the rest is the caller's
		default:
			st.err = e
			return true
		}
	}
	return true
}

// rawConn returns c's RawConn when a batch can be written to it with one
// writev (a plain TCP connection), else nil.
func rawConn(c net.Conn) syscall.RawConn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}
