//go:build !unix

package relay

import "net"

// tryWritev writes nothing here: the writer's goroutine writes it all.
func tryWritev(c net.Conn, bufs net.Buffers) (rest net.Buffers, err error) {
	return bufs, nil
}
