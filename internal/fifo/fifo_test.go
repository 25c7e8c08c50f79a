package fifo

import "testing"

// Entries come out once each, in order, whatever the mix of pushes and
// pops, and At sees them where Pop will take them.
func TestQueueOrder(t *testing.T) {
	var pool Pool[int]
	q := Queue[int]{Pool: &pool}
	next, want := 0, 0
	for round := 0; round < 300; round++ {
		for i := 0; i < round*37%(3*chunkLen+5); i++ {
			q.Push(next)
			next++
		}
		if q.Len() != next-want {
			t.Fatalf("Len %d, want %d", q.Len(), next-want)
		}
		for i := 0; i < q.Len(); i += 17 {
			if v := *q.At(i); v != want+i {
				t.Fatalf("At(%d) = %d, want %d", i, v, want+i)
			}
		}
		for i := 0; i < round*29%(2*chunkLen+3) || round%5 == 0; i++ {
			v, ok := q.Pop()
			if !ok {
				break
			}
			if v != want {
				t.Fatalf("Pop = %d, want %d", v, want)
			}
			want++
		}
	}
	for {
		v, ok := q.Pop()
		if !ok {
			break
		}
		if v != want {
			t.Fatalf("Pop = %d, want %d", v, want)
		}
		want++
	}
	if want != next || q.Len() != 0 || len(q.chunks) != 0 {
		t.Fatalf("popped %d of %d; Len %d, %d chunks held", want, next, q.Len(), len(q.chunks))
	}
}

// Popped and reset entries are zeroed, so a pooled chunk keeps nothing
// alive.
func TestQueueLetsGo(t *testing.T) {
	var pool Pool[*int]
	q := Queue[*int]{Pool: &pool}
	for i := 0; i < 3*chunkLen; i++ {
		q.Push(new(int))
	}
	held := q.chunks[0]
	for i := 0; i < chunkLen+1; i++ {
		q.Pop()
	}
	for i, p := range held {
		if p != nil {
			t.Fatalf("entry %d of a released chunk still set", i)
		}
	}
	q.Push(new(int)) // into a third chunk
	chunks := append([]*chunk[*int](nil), q.chunks...)
	if len(chunks) < 2 || q.head == 0 {
		t.Fatalf("%d chunks, head %d: not a queue that starts inside its first chunk", len(chunks), q.head)
	}
	q.Reset()
	for n, c := range chunks {
		for i, p := range c {
			if p != nil {
				t.Fatalf("entry %d of reset chunk %d still set", i, n)
			}
		}
	}
}

// BenchmarkDrainEachTime is a socket that keeps up: one entry in, one out.
func BenchmarkDrainEachTime(b *testing.B) {
	type entry struct {
		p    *int
		b    []byte
		pad  [10]int
		name string
	}
	var pool Pool[entry]
	q := Queue[entry]{Pool: &pool}
	x := new(int)
	for b.Loop() {
		q.Push(entry{p: x})
		q.Pop()
	}
}

// A queue that fills and drains with every entry (a browser socket that
// keeps up) makes no new list of chunks each time (one allocation per
// event otherwise), and holds no chunk when empty.
func TestQueueDrainedEachTimeKeepsItsList(t *testing.T) {
	var pool Pool[int]
	q := Queue[int]{Pool: &pool}
	q.Push(1)
	q.Pop()
	if cap(q.chunks) == 0 {
		t.Fatal("the drained queue let its list of chunks go")
	}
	list := &q.chunks[:1][0]
	for i := 0; i < 100; i++ {
		q.Push(i)
		if v, _ := q.Pop(); v != i {
			t.Fatalf("popped %d, want %d", v, i)
		}
	}
	if len(q.chunks) != 0 || &q.chunks[:1][0] != list {
		t.Fatalf("an empty queue holds %d chunks, or made a new list", len(q.chunks))
	}
}
