package dispatch

import "sort"

// fairQueue holds a pool's waiting jobs and decides which runs next: users
// with a higher priority first; among users of the same priority, the one
// with the fewest jobs running, ties taken in turn (round robin); each
// user's own jobs in the order they came. So one user's batch of fifty does
// not hold up everyone else.
// Not safe for concurrent use: the pool's lock guards it.
type fairQueue struct {
	byUser map[string][]*run
	// lines holds, per priority, the users with waiting jobs in turn
	// order; a user served moves to the back of their line.
	lines map[int][]string
	prios []int // keys of lines, highest first
	prio  map[string]int
	// served records when each user last had a job started (a sequence
	// number), so turns go to whoever waited longest since their last one.
	served map[string]uint64
	seq    uint64
}

// markServed records that a job of the user started (also one that went
// to an endpoint without waiting).
func (q *fairQueue) markServed(user string) {
	q.seq++
	if q.served == nil {
		q.served = map[string]uint64{}
	}
	q.served[user] = q.seq
}

func newFairQueue() *fairQueue {
	return &fairQueue{byUser: map[string][]*run{}, lines: map[int][]string{}, prio: map[string]int{}}
}

func (q *fairQueue) len() int {
	n := 0
	for _, rs := range q.byUser {
		n += len(rs)
	}
	return n
}

func (q *fairQueue) userLen(user string) int { return len(q.byUser[user]) }

// push adds a job at the back of its user's own line. A user's priority is
// that of their first waiting job.
func (q *fairQueue) push(r *run) {
	u := r.job.User
	if len(q.byUser[u]) == 0 {
		p := r.job.Priority
		q.prio[u] = p
		if _, ok := q.lines[p]; !ok {
			q.prios = append(q.prios, p)
			sort.Sort(sort.Reverse(sort.IntSlice(q.prios)))
		}
		q.lines[p] = append(q.lines[p], u)
	}
	q.byUser[u] = append(q.byUser[u], r)
}

// pushFront puts a job back at the head of its user's own line (a retry
// keeps its place).
func (q *fairQueue) pushFront(r *run) {
	u := r.job.User
	if len(q.byUser[u]) == 0 {
		q.push(r)
		return
	}
	q.byUser[u] = append([]*run{r}, q.byUser[u]...)
}

// remove takes a job out; it reports whether it was there.
func (q *fairQueue) remove(r *run) bool {
	u := r.job.User
	rs := q.byUser[u]
	for i, w := range rs {
		if w == r {
			q.byUser[u] = append(rs[:i:i], rs[i+1:]...)
			if len(q.byUser[u]) == 0 {
				q.dropUser(u)
			}
			return true
		}
	}
	return false
}

func (q *fairQueue) dropUser(u string) {
	p := q.prio[u]
	delete(q.byUser, u)
	delete(q.prio, u)
	line := q.lines[p]
	for i, o := range line {
		if o == u {
			line = append(line[:i:i], line[i+1:]...)
			break
		}
	}
	if len(line) == 0 {
		delete(q.lines, p)
		for i, x := range q.prios {
			if x == p {
				q.prios = append(q.prios[:i:i], q.prios[i+1:]...)
				break
			}
		}
		return
	}
	q.lines[p] = line
}

// turn returns the users in the order they will be served: by priority
// (highest first), then by turn order.
func (q *fairQueue) turn() []string {
	var users []string
	for _, p := range q.prios {
		users = append(users, q.lines[p]...)
	}
	return users
}

// next takes the job that runs next among those whose user may start one
// now (eligible), or returns nil. running counts each user's jobs running
// now (nil: none).
func (q *fairQueue) next(eligible func(user string) bool, running map[string]int) *run {
	for _, p := range q.prios {
		line := q.lines[p]
		best := -1
		for i, u := range line {
			if !eligible(u) {
				continue
			}
			if best < 0 {
				best = i
				continue
			}
			b := line[best]
			if running[u] < running[b] || running[u] == running[b] && q.served[u] < q.served[b] {
				best = i
			}
		}
		if best < 0 {
			continue
		}
		u := line[best]
		q.markServed(u)
		rs := q.byUser[u]
		r := rs[0]
		q.byUser[u] = rs[1:]
		if len(q.byUser[u]) == 0 {
			q.dropUser(u)
		} else {
			// Served: to the back of the line.
			copy(line[best:], line[best+1:])
			line[len(line)-1] = u
		}
		return r
	}
	return nil
}

// positions returns each waiting job's place in the planned order (1 =
// next), assuming jobs start one at a time and none ends meanwhile.
func (q *fairQueue) positions(running map[string]int) map[*run]int {
	c := &fairQueue{byUser: map[string][]*run{}, lines: map[int][]string{}, prio: map[string]int{}, served: map[string]uint64{}, seq: q.seq}
	for u, n := range q.served {
		c.served[u] = n
	}
	for u, rs := range q.byUser {
		c.byUser[u] = append([]*run(nil), rs...)
		c.prio[u] = q.prio[u]
	}
	for p, line := range q.lines {
		c.lines[p] = append([]string(nil), line...)
	}
	c.prios = append([]int(nil), q.prios...)
	counts := map[string]int{}
	for u, n := range running {
		counts[u] = n
	}
	out := map[*run]int{}
	for pos := 1; ; pos++ {
		r := c.next(func(string) bool { return true }, counts)
		if r == nil {
			return out
		}
		out[r] = pos
		counts[r.job.User]++
	}
}

// all returns every waiting job (any order) and empties the queue.
func (q *fairQueue) drain() []*run {
	var out []*run
	for _, u := range q.turn() {
		out = append(out, q.byUser[u]...)
	}
	q.byUser, q.lines, q.prios, q.prio = map[string][]*run{}, map[int][]string{}, nil, map[string]int{}
	return out
}
