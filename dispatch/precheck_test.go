package dispatch

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
)

// BenchmarkPrecheck4000Nodes times the refusal of a 4000-node prompt whose
// every node names a model the pool lacks (issue 8: 30 s and 104 MiB
// before; now linear, with a bounded answer).
func BenchmarkPrecheck4000Nodes(b *testing.B) {
	var models []string
	for i := 0; i < 25; i++ {
		models = append(models, fmt.Sprintf("model_%02d.safetensors", i))
	}
	m := NewManager(NewMemoryStore(), nil, zap.NewNop())
	p := &Pool{Name: "gpu"}
	p.info = &installInfo{fetched: time.Now(), classes: map[string]classInfo{
		"Loader": {combos: map[string]combo{"ckpt_name": newCombo(models)}},
	}}
	pr := &comfy.PromptRequest{Prompt: map[string]comfy.Node{}}
	for i := 0; i < 4000; i++ {
		pr.Prompt[fmt.Sprintf("%04d", i)] = comfy.Node{ClassType: "Loader", Inputs: map[string]json.RawMessage{"ckpt_name": json.RawMessage(`"missing.safetensors"`)}}
	}
	b.ReportAllocs()
	for b.Loop() {
		err := m.precheck.check(context.Background(), p, pr)
		var re *RejectedError
		if !asRejected(err, &re) || len(re.Body) > 64<<10 {
			b.Fatalf("%v", err)
		}
		b.ReportMetric(float64(len(re.Body)), "body-bytes")
	}
}

func asRejected(err error, re **RejectedError) bool {
	r, ok := err.(*RejectedError)
	*re = r
	return ok
}
