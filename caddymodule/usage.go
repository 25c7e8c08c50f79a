package caddymodule

import (
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/usage"
)

// runningManager returns the dispatcher of the running comfyume app, or
// the admin API error to answer.
func runningManager() (*dispatch.Manager, error) {
	app, err := caddy.ActiveContext().AppIfConfigured("comfyume")
	if err != nil || app == nil {
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("comfyume is not configured")}
	}
	a, ok := app.(*App)
	if !ok || a.gateway == nil {
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("comfyume is not running")}
	}
	return a.gateway.Manager(), nil
}

func badRequest(err error) error {
	return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
}

// handleUsage answers GET /comfyume/usage: rows of use per day, pool and
// user, as JSON (default) or CSV (format=csv, or Accept: text/csv).
func handleUsage(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: GET")}
	}
	m, err := runningManager()
	if err != nil {
		return err
	}
	q, err := usage.ParseQuery(r.URL.Query(), time.Now())
	if err != nil {
		return badRequest(err)
	}
	format := r.URL.Query().Get("format")
	switch format {
	case "":
		if strings.Contains(r.Header.Get("Accept"), "text/csv") {
			format = "csv"
		}
	case "csv", "json":
	default:
		return badRequest(fmt.Errorf("format %q: use json or csv", usage.Clip(format)))
	}
	l := m.Usage()
	if l == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("no usage is kept")}
	}
	rows, err := l.Usage(r.Context(), q)
	if errors.Is(err, usage.ErrTooManyRows) {
		return caddy.APIError{HTTPStatus: http.StatusRequestEntityTooLarge, Err: err}
	}
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
	}
	if format == "csv" {
		w.Header().Set("Content-Type", "text/csv; charset=utf-8")
		w.Header().Set("Content-Disposition", `attachment; filename="comfyume-usage-`+q.Since+`-`+q.Until+`.csv"`)
		cw := csv.NewWriter(w)
		_ = cw.Write(usage.Columns)
		for _, row := range rows {
			rec := row.Record()
			for i, f := range rec {
				rec[i] = csvSafe(f)
			}
			_ = cw.Write(rec)
		}
		cw.Flush()
		return cw.Error()
	}
	w.Header().Set("Content-Type", "application/json")
	if rows == nil {
		rows = []usage.Row{}
	}
	return json.NewEncoder(w).Encode(rows)
}

// csvSafe keeps a spreadsheet from taking a user name for a formula.
func csvSafe(s string) string {
	if s != "" && strings.ContainsRune("=+-@\t\r", rune(s[0])) {
		if _, err := strconv.ParseFloat(s, 64); err != nil {
			return "'" + s
		}
	}
	return s
}

// handleUsageUser answers POST /comfyume/usage/<user>/reset and
// /comfyume/usage/<user>/raise?gpu=<duration>&jobs=<n>, for today (UTC) on
// one pool (pool=<name>) or every pool, with the user's rows for today.
func handleUsageUser(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.EscapedPath(), "/comfyume/usage/")
	i := strings.LastIndexByte(rest, '/')
	if i <= 0 {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("use POST /comfyume/usage/<user>/reset or /raise")}
	}
	action := rest[i+1:]
	user, err := url.PathUnescape(rest[:i])
	if err != nil {
		return badRequest(fmt.Errorf("user: %v", err))
	}
	if action != "reset" && action != "raise" {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("%q: use reset or raise", usage.Clip(action))}
	}
	if r.Method != http.MethodPost {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: POST")}
	}
	if err := usage.CheckUser(user); err != nil {
		return badRequest(err)
	}
	m, err := runningManager()
	if err != nil {
		return err
	}
	l := m.Usage()
	if l == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("no usage is kept")}
	}
	qv := r.URL.Query()
	allowed := []string{"pool"}
	if action == "raise" {
		allowed = append(allowed, "gpu", "jobs")
	}
	for k, vs := range qv {
		if !slices.Contains(allowed, k) {
			return badRequest(fmt.Errorf("unknown parameter %q for %s: use %s", usage.Clip(k), action, strings.Join(allowed, ", ")))
		}
		if len(vs) > 1 {
			return badRequest(fmt.Errorf("parameter %q given %d times", usage.Clip(k), len(vs)))
		}
	}
	pools := m.PoolNames()
	if p := qv.Get("pool"); p != "" {
		if !slices.Contains(pools, p) {
			return badRequest(fmt.Errorf("pool %q is not configured", usage.Clip(p)))
		}
		pools = []string{p}
	}
	var gpu time.Duration
	var jobs int64
	if action == "raise" {
		if v := qv.Get("gpu"); v != "" {
			d, err := caddy.ParseDuration(v)
			if err != nil || d <= 0 || d > maxRaise {
				return badRequest(fmt.Errorf("gpu %q: want a duration from 1s to %s, e.g. 10m", usage.Clip(v), maxRaise))
			}
			gpu = d
		}
		if v := qv.Get("jobs"); v != "" {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n <= 0 || n > maxRaiseJobs {
				return badRequest(fmt.Errorf("jobs %q: want a number from 1 to %d", usage.Clip(v), maxRaiseJobs))
			}
			jobs = n
		}
		if gpu == 0 && jobs == 0 {
			return badRequest(errors.New("raise by what? give gpu=<duration> and/or jobs=<n>"))
		}
	}
	day := usage.DayOf(time.Now())
	for _, p := range pools {
		if action == "reset" {
			err = l.Reset(r.Context(), day, p, user)
		} else {
			err = l.Raise(r.Context(), day, p, user, gpu, jobs)
		}
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
		}
	}
	q := usage.Query{Since: day, Until: day, User: user}
	if len(pools) == 1 {
		q.Pool = pools[0]
	}
	rows, err := l.Usage(r.Context(), q)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
	}
	if rows == nil {
		rows = []usage.Row{}
	}
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(rows)
}

// Bounds of one raise.
const (
	maxRaise     = 1000 * time.Hour
	maxRaiseJobs = 1000000
)

// usageMetrics exposes this gateway's usage totals per pool (and per user
// with metrics_per_user), read when scraped.
type usageMetrics struct{ app *App }

var (
	metricGPU = prometheus.NewDesc("comfyume_gpu_seconds_total",
		"GPU time of the jobs that ended on this gateway (execution_start to end).", []string{"pool"}, nil)
	metricWait = prometheus.NewDesc("comfyume_wait_seconds_total",
		"Time those jobs waited before they ran (queue, cold start, inputs).", []string{"pool"}, nil)
	metricPoolJobs = prometheus.NewDesc("comfyume_pool_jobs_total",
		"Jobs that ran on the pool and ended on this gateway, by outcome (success, error, interrupted, lost).", []string{"pool", "outcome"}, nil)
	metricBytes = prometheus.NewDesc("comfyume_output_bytes_total",
		"Bytes of outputs those jobs stored.", []string{"pool"}, nil)
	metricRefused = prometheus.NewDesc("comfyume_quota_refused_total",
		"Prompts refused over a quota on this gateway, by quota (gpu_time, jobs).", []string{"pool", "quota"}, nil)
	metricQuotaGPU = prometheus.NewDesc("comfyume_pool_quota_gpu_seconds",
		"The pool's daily GPU time quota per user (0: none).", []string{"pool"}, nil)
	metricQuotaJobs = prometheus.NewDesc("comfyume_pool_quota_jobs",
		"The pool's daily prompts per user (0: no limit).", []string{"pool"}, nil)
	metricUserGPU = prometheus.NewDesc("comfyume_user_gpu_seconds_total",
		"GPU time per user (metrics_per_user).", []string{"pool", "user"}, nil)
	metricUserWait = prometheus.NewDesc("comfyume_user_wait_seconds_total",
		"Waiting time per user (metrics_per_user).", []string{"pool", "user"}, nil)
	metricUserJobs = prometheus.NewDesc("comfyume_user_jobs_total",
		"Jobs per user by outcome (metrics_per_user).", []string{"pool", "user", "outcome"}, nil)
	metricUserRefused = prometheus.NewDesc("comfyume_user_quota_refused_total",
		"Prompts refused over a quota per user (metrics_per_user).", []string{"pool", "user", "quota"}, nil)
)

// Describe implements prometheus.Collector.
func (u usageMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{metricGPU, metricWait, metricPoolJobs, metricBytes, metricRefused,
		metricQuotaGPU, metricQuotaJobs, metricUserGPU, metricUserWait, metricUserJobs, metricUserRefused} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. Every configured pool has its
// series from the start (zeros), so dashboards and rates see them.
func (u usageMetrics) Collect(ch chan<- prometheus.Metric) {
	g := u.app.gateway
	if g == nil {
		return
	}
	m := g.Manager()
	pools, users := m.UsageCounters().Snapshot()
	byPool := map[string]usage.Counts{}
	for _, c := range pools {
		byPool[c.Pool] = c
	}
	names := m.PoolNames()
	for p := range byPool {
		if !slices.Contains(names, p) {
			names = append(names, p)
		}
	}
	slices.Sort(names)
	for _, p := range names {
		c := byPool[p]
		ch <- prometheus.MustNewConstMetric(metricGPU, prometheus.CounterValue, c.GPUSeconds, p)
		ch <- prometheus.MustNewConstMetric(metricWait, prometheus.CounterValue, c.WaitSeconds, p)
		ch <- prometheus.MustNewConstMetric(metricBytes, prometheus.CounterValue, float64(c.OutputBytes), p)
		for i, o := range usage.Outcomes {
			ch <- prometheus.MustNewConstMetric(metricPoolJobs, prometheus.CounterValue, float64(c.Jobs[i]), p, string(o))
		}
		ch <- prometheus.MustNewConstMetric(metricRefused, prometheus.CounterValue, float64(c.RefusedGPU), p, usage.KindGPU)
		ch <- prometheus.MustNewConstMetric(metricRefused, prometheus.CounterValue, float64(c.RefusedJobs), p, usage.KindJobs)
		if lim, ok := m.Quota(p); ok {
			ch <- prometheus.MustNewConstMetric(metricQuotaGPU, prometheus.GaugeValue, lim.GPU.Seconds(), p)
			ch <- prometheus.MustNewConstMetric(metricQuotaJobs, prometheus.GaugeValue, float64(lim.Jobs), p)
		}
	}
	for _, c := range validLabels(users) {
		ch <- prometheus.MustNewConstMetric(metricUserGPU, prometheus.CounterValue, c.GPUSeconds, c.Pool, c.User)
		ch <- prometheus.MustNewConstMetric(metricUserWait, prometheus.CounterValue, c.WaitSeconds, c.Pool, c.User)
		for i, o := range usage.Outcomes {
			ch <- prometheus.MustNewConstMetric(metricUserJobs, prometheus.CounterValue, float64(c.Jobs[i]), c.Pool, c.User, string(o))
		}
		ch <- prometheus.MustNewConstMetric(metricUserRefused, prometheus.CounterValue, float64(c.RefusedGPU), c.Pool, c.User, usage.KindGPU)
		ch <- prometheus.MustNewConstMetric(metricUserRefused, prometheus.CounterValue, float64(c.RefusedJobs), c.Pool, c.User, usage.KindJobs)
	}
}

// validLabels makes user names valid label values (UTF-8: an id from a
// header may not be), adding up users whose names become the same, so that
// no two series collide and the scrape never fails.
func validLabels(users []usage.Counts) []usage.Counts {
	out := make([]usage.Counts, 0, len(users))
	at := map[[2]string]int{}
	for _, c := range users {
		c.User = strings.ToValidUTF8(c.User, "\uFFFD")
		k := [2]string{c.Pool, c.User}
		i, seen := at[k]
		if !seen {
			at[k] = len(out)
			out = append(out, c)
			continue
		}
		o := &out[i]
		o.GPUSeconds += c.GPUSeconds
		o.WaitSeconds += c.WaitSeconds
		o.OutputBytes += c.OutputBytes
		o.RefusedGPU += c.RefusedGPU
		o.RefusedJobs += c.RefusedJobs
		for j := range o.Jobs {
			o.Jobs[j] += c.Jobs[j]
		}
	}
	return out
}

var _ prometheus.Collector = usageMetrics{}
