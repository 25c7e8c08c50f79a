package dispatch

import (
	"context"
	"time"
)

// SharedQueue is implemented by stores that several gateways share (Valkey):
// they keep each pool's waiting jobs in one queue for every gateway, so that
// whichever gateway sees an endpoint free takes the globally next job by
// the pool's fair rule — not merely the next of the jobs it was sent — and
// hands it to the gateway that holds it.
//
// The fair rule is the one of the memory queue: users with a higher
// priority first; among users of one priority, the one with the fewest jobs
// running on the pool (counted from the endpoints' shared slots, so across
// every gateway), then the one served least recently, then the one who came
// first; each user's own jobs in the order they were made.
type SharedQueue interface {
	SharedSlots
	// Enqueue puts a job in its pool's queue. Enqueueing a job that waits
	// already changes nothing; a job put back (a retry after a cold start)
	// takes its old place in its user's line, which is ordered by Order.
	Enqueue(ctx context.Context, j QueuedJob) error
	// Dequeue takes a waiting job out of the queue (it was cancelled). It
	// reports false if the job was not waiting (already taken, or never
	// queued).
	Dequeue(ctx context.Context, pool, user, id string) (bool, error)
	// Take does, atomically: pick an endpoint with a free slot (the least
	// loaded of Endpoints, else the first free of Trial), pick the next job
	// by the fair rule among users under MaxRunning, take the job out of
	// the queue, mark its user served and give it the slot. The job is
	// handed to the gateway holding its lease: in the returned Assignment
	// when that is Owner, the caller; otherwise in that gateway's inbox
	// (see Assignments). It returns nil when no endpoint has room or no
	// job may start.
	Take(ctx context.Context, t TakeRequest) (*Assignment, error)
	// Assignments waits up to wait for jobs that other gateways handed to
	// owner, and returns them (none when wait passed first).
	Assignments(ctx context.Context, owner string, wait time.Duration) ([]Assignment, error)
	// Waiting counts one user's waiting jobs in a pool (for max_queued).
	Waiting(ctx context.Context, pool, user string) (int, error)
	// PoolWaiting counts the users with jobs waiting in a pool (0: none).
	PoolWaiting(ctx context.Context, pool string) (int, error)
	// QueueState returns everything the pool's order depends on, to tell
	// users where their jobs stand. endpoints are the pool's endpoints
	// (their slots give the running counts).
	QueueState(ctx context.Context, pool string, endpoints []string) (*QueueState, error)
}

// QueuedJob is a job as the shared queue knows it.
type QueuedJob struct {
	Pool string
	ID   string
	User string
	// Priority of the user, taken from their first waiting job.
	Priority int
	// Order sorts a user's own jobs (their creation time).
	Order float64
}

// TakeRequest asks a SharedQueue for the next job of a pool.
type TakeRequest struct {
	Pool string
	// Endpoints may take a job now (healthy, in this gateway's view).
	Endpoints []EndpointSlots
	// Trial endpoints are down but due for a trial job; one is used only
	// when no endpoint of Endpoints has room.
	Trial []EndpointSlots
	// Others are the pool's remaining endpoints: only their running jobs
	// count (toward users' running totals).
	Others []string
	// MaxRunning caps each user's running jobs on the pool (0: no cap).
	MaxRunning int
	// Token names the slot (the user's name is appended to it).
	Token string
	// TTL is how long the slot lasts without renewal.
	TTL time.Duration
	// Owner is the caller's lease owner name.
	Owner string
}

// EndpointSlots is an endpoint and its capacity (0: unlimited).
type EndpointSlots struct {
	Endpoint string
	Max      int
}

// Assignment is a job given a slot on an endpoint by Take.
type Assignment struct {
	Pool     string
	JobID    string
	User     string
	Endpoint string
	// Token is the slot's name, for RenewSlot and ReleaseSlot.
	Token string
	// Owner is the gateway holding the job's lease ("" when nobody holds
	// it: the caller may take the job over).
	Owner string
}

// QueueState is a pool's shared queue at one moment.
type QueueState struct {
	// Users with waiting jobs, in the order the rule ranks them before
	// running counts are considered.
	Users []QueuedUser
	// Running counts each user's jobs holding a slot on the pool.
	Running map[string]int
}

// QueuedUser is one user's line in a shared queue.
type QueuedUser struct {
	User     string
	Priority int
	// Served orders users by when a job of theirs last started (0: never).
	Served uint64
	// Jobs are the user's waiting job ids, next first.
	Jobs []string
}
