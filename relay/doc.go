// Package relay is what the browser sees: it owns each browser's WebSocket,
// merges a user's home ComfyUI with the jobs the gateway ran elsewhere,
// captures outputs into a blob store and serves them on /view, and answers
// the queue, history and jobs APIs per user.
//
// # From a job event to the browser's bytes
//
// One path, whatever the event's source. A GPU job's events come from
// dispatch (its package comment follows one from the GPU server's frame to
// Gateway.Capture and Gateway.Deliver): Capture stores an executed event's
// outputs and rewrites their refs, and Deliver hands each event — the
// upstream's own bytes, as a rule — to the hub:
//
//  1. Publish. A remote job's event (Gateway.Deliver, or several with
//     Gateway.DeliverAll) becomes a frame handed to Hub.publish (publishAll)
//     with its user and browser session (the clientId). With a bus (several gateways on Valkey) the frame is
//     published there first — lifecycle frames also go into the session's
//     replay log — and the other gateways receive it in their bus
//     subscription (Hub.deliverBus).
//  2. Session. The hub looks up the session's sockets on this gateway. A
//     session with no socket keeps lifecycle frames (bounded) for the tab's
//     reconnect; with a bus the replay log does that.
//  3. Socket queue. Each socket only queues the frame (socket.send,
//     socket.deliver) and returns: a job's goroutine, the bus subscription
//     and a slot release never wait for a browser. The queue is bounded in
//     bytes (Config.MaxSocketQueue). A browser that keeps up gets every
//     frame in order. When one socket's queue goes over its bound, progress
//     (progress, progress_state, progress text) and previews are coalesced
//     to the latest per node and prompt, in the place of the newest;
//     lifecycle frames (execution_*, executing, executed, status, anything
//     unknown) are all kept in order. A queue still over its bound after
//     a grace period, or over twice it, closes the socket with a reason:
//     the browser reconnects and gets what it missed from the replay.
//  4. Writer. Whoever finds the socket idle writes, everything queued,
//     as one vectored write per batch, in few long buffers (headers and
//     small frames back to back, previews' images from where they are:
//     writeScratch). A job's goroutine (or, for progress and previews
//     without a bus, the GPU stream's reader itself: Gateway.Inline)
//     hands the events it has at hand together (Gateway.DeliverAll: one
//     session lookup and one socket lock for all of them), and then
//     writes the batch itself, but only what the
//     connection takes at once: if the browser's socket buffer fills, a
//     goroutine writes the rest and goes on with the queue until it is
//     empty (an idle socket has none). Other publishers (the bus
//     subscription, queue counts) start such a goroutine at once; the
//     socket's home relay writes as a job's goroutine does (what the
//     connection takes at once, a goroutine the rest), and its read loop
//     (the greeting, the feature_flags answer) writes inline.
//     So a frame that finds the socket idle goes out at once, with no
//     hand-off. A connection that cannot be written without waiting (TLS)
//     is written by a goroutine of its own from the start. Frames are
//     framed by the gateway itself on the hijacked connection; gorilla's
//     own control frames (pongs, close replies) are routed into the same
//     queue, so exactly one writer ever writes.
//  5. Lent frames. The GPU stream's reader lends its progress and
//     previews (frame.lender: the bytes are its read buffer) to the
//     DeliverAll it hands them with, before it reads over them. Only it
//     writes them from where they lie: each socket writes what its
//     connection takes at once, and whatever must wait — in a queue
//     behind a slow browser or another writer, in the rest of a half-done
//     write, on another writer's batch (another job's reader writing to
//     the same tab), in a session's backlog — is copied before DeliverAll
//     returns. A browser that keeps up costs no copy.
//
// The home relay of a socket reads the user's home ComfyUI stream and
// queues its frames the same way, never waiting for the browser: a home
// shared by many users writes to their sockets one after another, and a
// link that stopped reading would stall them all. It re-dials home with
// backoff, also when a fresh link is dropped at once. A user may open Config.MaxSocketsPerUser
// sockets per gateway; more are refused with close code 1008.
package relay
