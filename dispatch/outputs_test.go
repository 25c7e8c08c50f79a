package dispatch

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/comfyume/comfyume/comfy"
)

// mergeDecoded is what mergeOutput replaced: both outputs decoded, the
// lists appended, the whole encoded again.
func mergeDecoded(old, add json.RawMessage) json.RawMessage {
	if len(old) == 0 {
		return add
	}
	var a, b map[string]json.RawMessage
	if json.Unmarshal(old, &a) != nil || json.Unmarshal(add, &b) != nil {
		return add
	}
	for k, v := range b {
		var la, lb []json.RawMessage
		if json.Unmarshal(a[k], &la) == nil && json.Unmarshal(v, &lb) == nil && la != nil {
			merged, _ := json.Marshal(append(la, lb...))
			a[k] = merged
			continue
		}
		a[k] = v
	}
	out, _ := json.Marshal(a)
	return out
}

// FuzzMergeOutput checks mergeOutput against decoding both outputs: the
// same JSON value, for any two objects.
func FuzzMergeOutput(f *testing.F) {
	for _, s := range [][2]string{
		{`{"images":[{"filename":"a.png"}]}`, `{"images":[{"filename":"b.png"}],"animated":[false]}`},
		{`{"images":[ ]}`, `{"images":[1]}`}, {`{"images":[1]}`, `{"images":[ ]}`},
		{`{"a":[1],"a":2}`, `{"a":[3],"a":[4]}`}, {`{"text":"x"}`, `{"text":["y"]}`},
		{`{"a":[1]}`, `{"a":null}`}, {`{"a":null}`, `{"a":[1]}`}, {`{}`, `{"é\u0000":[1]}`},
	} {
		f.Add([]byte(s[0]), []byte(s[1]))
	}
	f.Fuzz(func(t *testing.T, old, add []byte) {
		var o, a map[string]json.RawMessage
		if json.Unmarshal(old, &o) != nil || json.Unmarshal(add, &a) != nil || o == nil || a == nil {
			return // outputs are JSON objects
		}
		got, want := mergeOutput(old, add), mergeDecoded(old, add)
		var g, w any
		if json.Unmarshal(got, &g) != nil || json.Unmarshal(want, &w) != nil || !reflect.DeepEqual(g, w) {
			t.Fatalf("mergeOutput(%s, %s) = %s, want %s", old, add, got, want)
		}
	})
}

// A GPU server that sends one node's output thousands of times, or
// thousands of nodes' outputs, cannot make a job's record grow past
// MaxRecordedOutputs, nor make each event cost a decoding of everything
// recorded so far (5000 events on one node took 35 s of CPU and 4 GiB of
// allocations); its start and cached messages are kept up to
// MaxRecordedMessages and MaxRecordedOutputs bytes, its end always.
func TestJobRecordBoundsServerEvents(t *testing.T) {
	pad := strings.Repeat("p", 200)
	j := &Job{}
	for i := 0; i < 20000; i++ {
		node := "1"
		if i%2 == 1 {
			node = fmt.Sprint(i)
		}
		m, err := comfy.ParseMessage([]byte(fmt.Sprintf(`{"type":"executed","data":{"node":%q,"output":{"images":[{"filename":"x%d.png","subfolder":%q,"type":"output"}]},"prompt_id":"p"}}`, node, i, pad)))
		if err != nil {
			t.Fatal(err)
		}
		j.Apply(m)
		cached, _ := comfy.ParseMessage([]byte(`{"type":"execution_cached","data":{"nodes":[],"prompt_id":"p"}}`))
		j.Apply(cached)
	}
	big := `{"type":"execution_cached","data":{"nodes":["` + strings.Repeat("n", 300<<10) + `"],"prompt_id":"p"}}`
	k := &Job{}
	for i := 0; i < 10; i++ {
		m, _ := comfy.ParseMessage([]byte(big))
		k.Apply(m)
	}
	if n := messagesSize(k.Messages); n > MaxRecordedOutputs {
		t.Fatalf("%d bytes of cached messages kept", n)
	}
	end, _ := comfy.ParseMessage([]byte(`{"type":"execution_success","data":{"prompt_id":"p"}}`))
	j.Apply(end)
	n := 0
	for k, v := range j.Outputs {
		n += len(k) + len(v)
	}
	if n > MaxRecordedOutputs || n < MaxRecordedOutputs/2 {
		t.Fatalf("the record keeps %d bytes of outputs (bound %d)", n, MaxRecordedOutputs)
	}
	if n != j.outputsSize() {
		t.Fatalf("outputs counted as %d bytes, are %d", j.outputsSize(), n)
	}
	if len(j.Messages) != MaxRecordedMessages+1 || j.Messages[len(j.Messages)-1].Type != comfy.MsgExecutionSuccess {
		t.Fatalf("%d messages kept, the last %s", len(j.Messages), j.Messages[len(j.Messages)-1].Type)
	}
	var first map[string][]any
	if err := json.Unmarshal(j.Outputs["1"], &first); err != nil || len(first["images"]) < 2 {
		t.Fatalf("node 1's merged output: %v, %d images", err, len(first["images"]))
	}
}
