package relay

import (
	"context"
	"net"
	"sync"
	"syscall"
)

// spareReader reads a connection for a WebSocket whose own read buffer is
// tiny (gorilla's bufio.Reader of frameHeadBuffer bytes: enough for a frame
// header or a control frame). What the network has for it is read in one
// go into a chunk from readChunks, which the connection holds only while
// bytes of it wait to be taken: an idle connection waits for readability
// holding no buffer at all. (Each browser socket and its home socket would
// otherwise hold a read buffer for as long as they are open; most of that
// time they are idle.)
//
// Only a plain TCP connection is waited on this way (through its file
// descriptor, which nothing else buffers in front of); any other is read
// straight into the caller's buffer (a TLS connection buffers a record on
// its own).
type spareReader struct {
	rc      syscall.RawConn // the connection's descriptor, when plain TCP (rawConn)
	readFD  func(fd uintptr) bool
	chunk   *[]byte // from readChunks, while pending is not empty
	pending []byte  // bytes read and not yet taken, in chunk
	n       int     // what the last readFD got
	err     error
}

// frameHeadBuffer is the read buffer gorilla gets over a spareReader: its
// minimum (a control frame's payload, 125 bytes, must fit), as a size class.
const frameHeadBuffer = 128

// readChunk is how much one read from the network takes at most.
const readChunk = 16 << 10

var readChunks = sync.Pool{New: func() any { b := make([]byte, readChunk); return &b }}

func newSpareReader(c net.Conn) spareReader { return spareReader{rc: rawConn(c)} }

// read reads from c (the connection the reader was made for) into p.
func (r *spareReader) read(c net.Conn, p []byte) (int, error) {
	if len(r.pending) == 0 {
		if r.rc == nil || len(p) >= readChunk {
			return c.Read(p)
		}
		if err := r.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	if len(r.pending) == 0 {
		readChunks.Put(r.chunk)
		r.chunk, r.pending = nil, nil
	}
	return n, nil
}

// fill waits until the connection has bytes (or an error) and reads them
// into a chunk of their own.
func (r *spareReader) fill() error {
	if r.readFD == nil {
		r.readFD = r.readFromFD
	}
	// Read deadlines and Close apply to the wait as to any Read.
	if err := r.rc.Read(r.readFD); err != nil {
		r.dropChunk()
		return err
	}
	n, err := r.n, r.err
	r.n, r.err = 0, nil
	if err != nil || n == 0 {
		r.dropChunk()
		return readErr(n, err)
	}
	r.pending = (*r.chunk)[:n]
	return nil
}

func (r *spareReader) dropChunk() {
	if r.chunk != nil {
		readChunks.Put(r.chunk)
		r.chunk = nil
	}
}

// spareConn is a connection read through a spareReader.
type spareConn struct {
	net.Conn
	in spareReader
}

func (c *spareConn) Read(p []byte) (int, error) { return c.in.read(c.Conn, p) }

// dialSpare dials a TCP connection read through a spareReader (a Dialer's
// NetDialContext).
func dialSpare(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &spareConn{Conn: c, in: newSpareReader(c)}, nil
}
