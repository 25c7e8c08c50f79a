//go:build !unix

package relay

import (
	"net"
	"syscall"
)

type writevState struct{}

// tryWritev writes nothing here: the writer's goroutine writes it all.
func tryWritev(rc syscall.RawConn, st *writevState, bufs net.Buffers) (rest net.Buffers, err error) {
	return bufs, nil
}

// rawConn is nil here: batches are written by net.Buffers.WriteTo.
func rawConn(c net.Conn) syscall.RawConn { return nil }
