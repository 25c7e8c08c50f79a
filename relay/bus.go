package relay

import (
	"bytes"
	"context"
	"encoding/json"

	"strconv"
	"strings"
	"time"

	"github.com/valkey-io/valkey-go"

	"github.com/comfyume/comfyume/comfy"
)

// Bus connects gateways (Caddy replicas) that share a store: a job's events
// reach its browser whichever replica holds the socket, queue changes reach
// every replica, and a browser reconnecting to any replica gets the events
// it missed. Without a bus a gateway works alone.
type Bus interface {
	// Publish hands a message to every gateway on the bus (this one too).
	// A session frame marked Keep is first added to the session's replay
	// log; Pos is then set to its position there.
	Publish(ctx context.Context, m *BusMessage) error
	// Run calls fn with every message published on the bus until ctx ends,
	// resubscribing after connection failures. subscribed is called each
	// time the subscription is (re)established: messages published while it
	// was down are lost, so the caller catches up from the replay logs.
	Run(ctx context.Context, fn func(BusMessage), subscribed func())
	// Missed returns the kept frames of a session after position since
	// ("" = all kept), oldest first.
	Missed(ctx context.Context, user, sid, since string) ([]BusMessage, error)
	// Seen records the last position a socket of the session received, and
	// LastSeen reads it back ("" if none).
	Seen(ctx context.Context, user, sid, pos string) error
	LastSeen(ctx context.Context, user, sid string) (string, error)
}

// Kinds of bus messages.
const (
	busKindFrame  = "frame"  // a frame for a browser session
	busKindQueue  = "queue"  // a user's queue changed
	busKindCancel = "cancel" // cancel a job, by whichever gateway runs it
)

// BusMessage is one message on the bus.
type BusMessage struct {
	Kind string `json:"k"`
	User string `json:"u"`
	SID  string `json:"s,omitempty"`
	// Pos is the frame's position in the session's replay log.
	Pos string `json:"p,omitempty"`
	// Keep asks for the frame to be kept for replay.
	Keep bool `json:"-"`
	// Text, Binary or Preview (a type-4 frame) carry the frame. On the
	// wire they follow the JSON header as raw bytes (see encodeBus); Body
	// says which one it is.
	Text    string `json:"t,omitempty"`
	Binary  []byte `json:"b,omitempty"`
	Preview []byte `json:"v,omitempty"`
	Body    string `json:"y,omitempty"`
	JobID   string `json:"j,omitempty"`
	// Origin names the gateway that published the message; it has
	// delivered it to its own sockets already.
	Origin string `json:"o,omitempty"`
}

// encodeBus encodes a bus message: its JSON header, a NUL byte (which
// never occurs in JSON), then the frame's bytes as they are — no base64 or
// JSON escaping of previews and events on every hop.
func encodeBus(m *BusMessage) []byte {
	h := *m
	var text string
	var body []byte
	switch {
	case h.Text != "":
		h.Body, text = "t", h.Text
	case h.Binary != nil:
		h.Body, body = "b", h.Binary
	case h.Preview != nil:
		h.Body, body = "v", h.Preview
	}
	h.Text, h.Binary, h.Preview = "", nil, nil
	head, _ := json.Marshal(&h)
	// The body is copied once, into out (no string conversion of a preview).
	out := make([]byte, 0, len(head)+1+len(text)+len(body))
	out = append(out, head...)
	out = append(out, 0)
	out = append(out, text...)
	return append(out, body...)
}

// decodeBus reads what encodeBus wrote (or a plain JSON message, as
// gateways before it published).
func decodeBus(b []byte, m *BusMessage) error {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return json.Unmarshal(b, m)
	}
	if err := json.Unmarshal(b[:i], m); err != nil {
		return err
	}
	body := b[i+1:]
	switch m.Body {
	case "t":
		m.Text = string(body)
	case "b":
		m.Binary = body
	case "v":
		m.Preview = body
	}
	m.Body = ""
	return nil
}

func frameMessage(user, sid string, f frame) *BusMessage {
	m := &BusMessage{Kind: busKindFrame, User: user, SID: sid}
	switch {
	case f.text != nil:
		m.Text = string(f.text)
		m.Keep = replayWorthy(f.text)
	case f.binary != nil:
		m.Binary = f.binary
	case f.preview != nil:
		md := f.preview.Metadata
		if md == nil {
			return m
		}
		m.Preview = f.preview.EncodeType4(*md)
	}
	return m
}

// replayWorthy says which frames a reconnecting browser needs: the job
// lifecycle events. Progress is transient and its next frame supersedes it.
func replayWorthy(text []byte) bool {
	t, ok := comfy.PeekType(text)
	if !ok {
		var head struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(text, &head) != nil {
			return false
		}
		t = head.Type
	}
	switch t {
	case "progress", "progress_state", "status", "feature_flags", comfy.MsgNotification:
		// (a waiting job's notification is told again when it changes,
		// and at least every few seconds)
		return false
	}
	return true
}

// ValkeyBus is a Bus over Valkey: pub/sub for delivery, one stream per
// browser session (bounded, expiring) for replay.
type ValkeyBus struct {
	client valkey.Client
	prefix string
	// ReplayLen bounds each session's replay log (default 1000 frames) and
	// ReplayTTL is how long it is kept after its last frame (default 10m).
	ReplayLen int64
	ReplayTTL time.Duration
}

// NewValkeyBus returns a bus using client, with keys and the channel under
// prefix.
func NewValkeyBus(client valkey.Client, prefix string) *ValkeyBus {
	return &ValkeyBus{client: client, prefix: prefix, ReplayLen: 1000, ReplayTTL: 10 * time.Minute}
}

func (b *ValkeyBus) channel() string { return b.prefix + "events" }

// sessionKey is a session's replay log: "<prefix>session:{<len>:<user>}:<sid>".
// Both strings come from outside (sid is the browser's clientId), so the
// user is length-prefixed: one key per (user, sid) pair, whatever either
// contains ("}", ":", "*", newlines). The {…} hash tag keeps a user's keys
// in one cluster slot (a "}" in the name shortens the tag, the same way for
// every key of that user).
func (b *ValkeyBus) sessionKey(user, sid string) string {
	return b.prefix + "session:" + userTag(user) + ":" + sid
}

// seenKey is how far a session's browser has read its replay log, keyed
// like sessionKey.
func (b *ValkeyBus) seenKey(user, sid string) string {
	return b.prefix + "seen:" + userTag(user) + ":" + sid
}

// userTag is "{<len>:<user>}": the user, delimited by its length.
func userTag(user string) string {
	return "{" + strconv.Itoa(len(user)) + ":" + user + "}"
}

// Publish implements Bus.
func (b *ValkeyBus) Publish(ctx context.Context, m *BusMessage) error {
	if m.Keep {
		entry := encodeBus(m)
		key := b.sessionKey(m.User, m.SID)
		cmd := b.client.B().Xadd().Key(key).Maxlen().Almost().Threshold(strconv.FormatInt(b.ReplayLen, 10)).Id("*").FieldValue().FieldValue("m", valkey.BinaryString(entry)).Build()
		id, err := b.client.Do(ctx, cmd).ToString()
		if err != nil {
			return err
		}
		if err := b.client.Do(ctx, b.client.B().Pexpire().Key(key).Milliseconds(b.ReplayTTL.Milliseconds()).Build()).Error(); err != nil {
			return err
		}
		m.Pos = id
	}
	return b.client.Do(ctx, b.client.B().Publish().Channel(b.channel()).Message(valkey.BinaryString(encodeBus(m))).Build()).Error()
}

// Run implements Bus.
func (b *ValkeyBus) Run(ctx context.Context, fn func(BusMessage), subscribed func()) {
	for ctx.Err() == nil {
		sctx := valkey.WithOnSubscriptionHook(ctx, func(s valkey.PubSubSubscription) {
			if s.Kind == "subscribe" && subscribed != nil {
				go subscribed()
			}
		})
		err := b.client.Receive(sctx, b.client.B().Subscribe().Channel(b.channel()).Build(), func(msg valkey.PubSubMessage) {
			var m BusMessage
			if decodeBus([]byte(msg.Message), &m) == nil {
				fn(m)
			}
		})
		if ctx.Err() != nil || err == nil {
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Missed implements Bus.
func (b *ValkeyBus) Missed(ctx context.Context, user, sid, since string) ([]BusMessage, error) {
	start := "-"
	if since != "" {
		start = "(" + since
	}
	entries, err := b.client.Do(ctx, b.client.B().Xrange().Key(b.sessionKey(user, sid)).Start(start).End("+").Build()).AsXRange()
	if err != nil {
		if valkey.IsValkeyNil(err) {
			return nil, nil
		}
		return nil, err
	}
	out := make([]BusMessage, 0, len(entries))
	for _, e := range entries {
		var m BusMessage
		if decodeBus([]byte(e.FieldValues["m"]), &m) != nil {
			continue
		}
		m.Pos = e.ID
		out = append(out, m)
	}
	return out, nil
}

// Seen implements Bus.
func (b *ValkeyBus) Seen(ctx context.Context, user, sid, pos string) error {
	return b.client.Do(ctx, b.client.B().Set().Key(b.seenKey(user, sid)).Value(pos).Px(b.ReplayTTL).Build()).Error()
}

// LastSeen implements Bus.
func (b *ValkeyBus) LastSeen(ctx context.Context, user, sid string) (string, error) {
	s, err := b.client.Do(ctx, b.client.B().Get().Key(b.seenKey(user, sid)).Build()).ToString()
	if valkey.IsValkeyNil(err) {
		return "", nil
	}
	return s, err
}

// posAfter reports whether stream position a comes after b.
func posAfter(a, b string) bool {
	if b == "" {
		return a != ""
	}
	am, as, _ := strings.Cut(a, "-")
	bm, bs, _ := strings.Cut(b, "-")
	if len(am) != len(bm) {
		return len(am) > len(bm)
	}
	if am != bm {
		return am > bm
	}
	if len(as) != len(bs) {
		return len(as) > len(bs)
	}
	return as > bs
}
