package caddymodule_test

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/usage"
)

// grafanaPanel is what the test reads of a dashboard panel.
type grafanaPanel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource json.RawMessage `json:"datasource"`
	GridPos    *struct{ X, Y, W, H int }
	Targets    []struct {
		RefID      string          `json:"refId"`
		Expr       string          `json:"expr"`
		Datasource json.RawMessage `json:"datasource"`
	} `json:"targets"`
}

// The Grafana dashboard in examples/grafana is a dashboard Grafana can
// import (panels with ids, positions and queries, the Prometheus data
// source a variable) and every metric it queries is one the gateway
// exports at /metrics (per-user ones with metrics_per_user).
func TestGrafanaDashboardQueriesExistingMetrics(t *testing.T) {
	raw, err := os.ReadFile("../examples/grafana/comfyume.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Title         string         `json:"title"`
		UID           string         `json:"uid"`
		SchemaVersion int            `json:"schemaVersion"`
		Panels        []grafanaPanel `json:"panels"`
		Templating    struct {
			List []struct {
				Name  string          `json:"name"`
				Type  string          `json:"type"`
				Query json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("not JSON: %v", err)
	}
	if d.Title == "" || d.UID == "" || d.SchemaVersion < 30 || len(d.Panels) == 0 {
		t.Fatalf("not a dashboard: title %q uid %q schema %d, %d panels", d.Title, d.UID, d.SchemaVersion, len(d.Panels))
	}
	dsVar := false
	var queries []string
	for _, v := range d.Templating.List {
		if v.Name == "datasource" && v.Type == "datasource" && string(v.Query) == `"prometheus"` {
			dsVar = true
		}
		queries = append(queries, string(v.Query))
	}
	if !dsVar {
		t.Fatal("no datasource variable of type prometheus")
	}
	ids := map[int]bool{}
	const ds = `{"type":"prometheus","uid":"${datasource}"}`
	for _, p := range d.Panels {
		if p.ID == 0 || ids[p.ID] || p.Type == "" || p.Title == "" || p.GridPos == nil || p.GridPos.W == 0 || p.GridPos.H == 0 {
			t.Fatalf("panel %+v: needs a unique id, a type, a title and a position", p)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if compact(p.Datasource) != ds || len(p.Targets) == 0 {
			t.Fatalf("panel %q: datasource %s, %d queries", p.Title, p.Datasource, len(p.Targets))
		}
		for _, q := range p.Targets {
			if q.Expr == "" || q.RefID == "" || compact(q.Datasource) != ds {
				t.Fatalf("panel %q: query %+v", p.Title, q)
			}
			queries = append(queries, q.Expr)
		}
	}
	names := map[string]bool{}
	for _, q := range queries {
		for _, n := range regexp.MustCompile(`\bcomfyume_[a-z_]+`).FindAllString(q, -1) {
			names[n] = true
		}
	}
	if len(names) < 10 {
		t.Fatalf("the dashboard queries only %d metrics: %v", len(names), names)
	}

	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}", "outputs disk {DATA}\n\t\tmetrics_per_user", 1)
	cf, admin := withAdmin(t, cf)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	job := g.queue("alice", b.SID, samplerWorkflow("gf", 1))
	b.untilJobEnd(job.PromptID, 20*time.Second)
	admin.waitRow("alice", func(r usage.Row) bool { return r.Jobs == 1 })
	_, m, _ := admin.do("GET", "/metrics")
	for n := range names {
		if !regexp.MustCompile(`(?m)^` + n + `[{ ]`).MatchString(m) {
			t.Errorf("the dashboard queries %s, which /metrics lacks", n)
		}
	}
	if !strings.Contains(m, `comfyume_user_gpu_seconds_total{pool="gpu",user="alice"}`) {
		t.Errorf("metrics_per_user: no series of alice:\n%s", grepLines(m, "comfyume_user"))
	}
}

func compact(b []byte) string {
	var v any
	if json.Unmarshal(b, &v) != nil {
		return string(b)
	}
	out, _ := json.Marshal(v)
	return string(out)
}
