package relay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/valkey-io/valkey-go"
)

// testBus is a ValkeyBus on the test Valkey (COMFYUME_TEST_VALKEY) under a
// prefix of its own, removed when the test ends.
func testBus(t *testing.T) (*ValkeyBus, valkey.Client, string) {
	t.Helper()
	addr := os.Getenv("COMFYUME_TEST_VALKEY")
	if addr == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("COMFYUME_TEST_VALKEY is not set in CI")
		}
		t.Skip("COMFYUME_TEST_VALKEY is not set (source scripts/services/valkey.sh; start_valkey)")
	}
	opt := valkey.ClientOption{InitAddress: []string{addr}}
	if strings.Contains(addr, "://") {
		var err error
		if opt, err = valkey.ParseURL(addr); err != nil {
			t.Fatal(err)
		}
	}
	client, err := valkey.NewClient(opt)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	prefix := "comfyume-test:" + hex.EncodeToString(b) + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if keys, err := client.Do(ctx, client.B().Keys().Pattern(prefix+"*").Build()).AsStrSlice(); err == nil && len(keys) > 0 {
			client.Do(ctx, client.B().Unlink().Key(keys...).Build())
		}
		client.Close()
	})
	return NewValkeyBus(client, prefix), client, prefix
}

// Issue 8, finding 7: replay logs and read marks of different (user,
// clientId) pairs never share a key, whatever the two strings contain: user
// "alice" with clientId "x}:victimsid" is not replayed user "alice}:x"'s
// session "victimsid".
func TestSessionKeysDoNotCollide(t *testing.T) {
	bus, client, prefix := testBus(t)
	ctx := context.Background()
	pairs := [][2]string{
		{"alice}:x", "victimsid"}, {"alice", "x}:victimsid"},
		{"a:b", "c"}, {"a", "b:c"},
		{"*", "*"}, {"a*", ""}, {"a", "*"},
		{"line\nbreak", "s"}, {"line", "\nbreak:s"},
		{"{x}", "y"}, {"", "{x}:y"}, {"5:alice}:x", "y"},
	}
	keys := map[string][2]string{}
	for _, p := range pairs {
		for _, k := range []string{bus.sessionKey(p[0], p[1]), bus.seenKey(p[0], p[1])} {
			if other, dup := keys[k]; dup {
				t.Errorf("%q and %q share key %q", p, other, k)
			}
			keys[k] = p
		}
	}
	// Against the real Valkey: each pair replays only what was kept for it.
	for i, p := range pairs {
		m := &BusMessage{Kind: busKindFrame, User: p[0], SID: p[1], Keep: true, Text: `{"n":` + string(rune('0'+i%10)) + `}`, Origin: "t"}
		if err := bus.Publish(ctx, m); err != nil {
			t.Fatal(err)
		}
		if err := bus.Seen(ctx, p[0], p[1], "0-"+string(rune('1'+i%9))); err != nil {
			t.Fatal(err)
		}
	}
	for i, p := range pairs {
		got, err := bus.Missed(ctx, p[0], p[1], "")
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].User != p[0] || got[0].SID != p[1] {
			t.Errorf("session %q replays %d frames: %+v", p, len(got), got)
		}
		if pos, err := bus.LastSeen(ctx, p[0], p[1]); err != nil || pos != "0-"+string(rune('1'+i%9)) {
			t.Errorf("session %q read mark %q %v", p, pos, err)
		}
	}
	n, err := client.Do(ctx, client.B().Keys().Pattern(prefix+"*").Build()).AsStrSlice()
	if err != nil || len(n) != 2*len(pairs) {
		t.Fatalf("%d keys for %d sessions (%v): %q", len(n), len(pairs), err, n)
	}
}
