package dispatch

import (
	"runtime"
	"strings"
	"testing"

	"github.com/comfyume/comfyume/comfy"
)

// Finding a prompt's output nodes reads only the inputs that link nodes: a
// user's list input of a million items is not decoded. (Each prompt's
// lists were decoded whole: a 20 MiB list, 1.5 GiB allocated and 7 s of
// CPU for one POST /prompt, on the gateway every user shares.)
func TestSinkNodesSkipHugeLists(t *testing.T) {
	body := `{"prompt":{"1":{"class_type":"A","inputs":{"list":[` + strings.Repeat("0,", 1<<20) + `0]}},` +
		`"2":{"class_type":"B","inputs":{"in":["1",0]}}}}`
	pr, berr := comfy.ParsePromptRequest([]byte(body))
	if berr != nil {
		t.Fatal(berr)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	sinks := sinkNodes(pr.Prompt)
	runtime.ReadMemStats(&after)
	if len(sinks) != 1 || sinks[0] != "2" {
		t.Fatalf("output nodes %v, want [2]", sinks)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
		t.Fatalf("%d MiB allocated for a 2 MiB list input", n>>20)
	}
}
