// Package fifo is the queue under a job's events and a browser socket's
// frames: first in, first out, indexable, in fixed chunks that come from a
// pool and go back to it as they are emptied. A queue that fills and
// drains all the time (thousands of events a second) thus neither grows
// arrays nor copies its entries, and an empty one holds no chunk.
package fifo

import "sync"

// chunkLen is how many entries a chunk holds.
const chunkLen = 128

type chunk[T any] [chunkLen]T

// Pool keeps emptied chunks for the queues that share it. Its zero value
// is ready to use.
type Pool[T any] struct{ p sync.Pool }

func (p *Pool[T]) get() *chunk[T] {
	if c, ok := p.p.Get().(*chunk[T]); ok {
		return c
	}
	return new(chunk[T])
}

// put takes back a chunk whose entries are all zero.
func (p *Pool[T]) put(c *chunk[T]) { p.p.Put(c) }

// Queue is a FIFO of T. Entries are addressed from the front: At(0) is the
// next to Pop. Its zero value is an empty queue that allocates its chunks;
// set Pool to share them.
type Queue[T any] struct {
	Pool   *Pool[T]
	chunks []*chunk[T]
	head   int // index of the front entry in chunks[0]
	n      int
}

// Len is the number of entries.
func (q *Queue[T]) Len() int { return q.n }

// Push adds v at the back.
func (q *Queue[T]) Push(v T) {
	end := q.head + q.n
	if end == len(q.chunks)*chunkLen {
		var c *chunk[T]
		if q.Pool != nil {
			c = q.Pool.get()
		} else {
			c = new(chunk[T])
		}
		q.chunks = append(q.chunks, c)
	}
	q.chunks[end/chunkLen][end%chunkLen] = v
	q.n++
}

// At returns the entry i places from the front (0 <= i < Len()); it may be
// changed in place.
func (q *Queue[T]) At(i int) *T {
	if i < 0 || i >= q.n {
		panic("fifo: index out of range")
	}
	i += q.head
	return &q.chunks[i/chunkLen][i%chunkLen]
}

// Pop removes and returns the front entry.
func (q *Queue[T]) Pop() (v T, ok bool) {
	if q.n == 0 {
		return v, false
	}
	c := q.chunks[0]
	v = c[q.head]
	var zero T
	c[q.head] = zero
	q.head++
	q.n--
	switch {
	case q.n == 0:
		q.Reset()
	case q.head == chunkLen:
		q.release(c)
		q.chunks[0] = nil
		q.chunks = q.chunks[1:]
		q.head = 0
	}
	return v, true
}

// Reset empties the queue and gives its chunks back. It keeps its list of
// chunks when that is short (a queue that fills and drains with every
// event would make one each time).
//
// Only the entries still in the queue are zeroed: the others are zero
// already (a pooled or new chunk is all zero, and Pop zeroes what it
// takes). A queue that drains with every event (a browser socket that
// keeps up, at a step every few milliseconds) used to clear a whole chunk
// each time: 15 KB of a socket's queue, about 1 % of the gateway's CPU in
// paced mode, and the cache lines of whatever ran next.
func (q *Queue[T]) Reset() {
	start, end := q.head, q.head+q.n
	for i, c := range q.chunks {
		if lo, hi := max(start-i*chunkLen, 0), min(end-i*chunkLen, chunkLen); lo < hi {
			clear(c[lo:hi])
		}
		q.release(c)
	}
	clear(q.chunks)
	if cap(q.chunks) > 4 {
		q.chunks = nil
	}
	q.chunks, q.head, q.n = q.chunks[:0], 0, 0
}

func (q *Queue[T]) release(c *chunk[T]) {
	if q.Pool != nil {
		q.Pool.put(c)
	}
}
