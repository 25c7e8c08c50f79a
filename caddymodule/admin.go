package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI adds comfyume's endpoint to Caddy's admin API:
//
//	GET /comfyume/pools
//
// lists each pool as this gateway sees it: jobs waiting (of every replica
// when the queue is shared in Valkey), jobs held for a cold start, jobs
// running, and each endpoint's health, jobs and transport.
//
//	GET /comfyume/ops
//	GET /comfyume/ops/events
//
// are the operator's page's state (JSON) and its stream of states
// (server-sent events), for scripts. The page itself is served on a site
// (OpsHandler): Caddy's admin API refuses browsers' navigations.
//
//	GET  /comfyume/usage?since=YYYY-MM-DD&until=YYYY-MM-DD&user=&pool=&format=json|csv
//	POST /comfyume/usage/<user>/reset[?pool=<pool>]
//	POST /comfyume/usage/<user>/raise?gpu=<duration>&jobs=<n>[&pool=<pool>]
//
// list each user's use of the pools per UTC day, and give a user their
// whole quota for today again, or more of it.
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "admin.api.comfyume", New: func() caddy.Module { return new(AdminAPI) }}
}

// Routes implements caddy.AdminRouter.
func (AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/comfyume/pools", Handler: caddy.AdminHandlerFunc(handlePools)},
		{Pattern: "/comfyume/ops", Handler: caddy.AdminHandlerFunc(handleOpsState)},
		{Pattern: "/comfyume/ops/events", Handler: caddy.AdminHandlerFunc(handleOpsEvents)},
		{Pattern: "/comfyume/usage", Handler: caddy.AdminHandlerFunc(handleUsage)},
		{Pattern: "/comfyume/usage/", Handler: caddy.AdminHandlerFunc(handleUsageUser)},
	}
}

func handlePools(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed")}
	}
	app, err := caddy.ActiveContext().AppIfConfigured("comfyume")
	if err != nil || app == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("comfyume is not configured")}
	}
	a, ok := app.(*App)
	if !ok || a.gateway == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("comfyume is not running")}
	}
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(a.gateway.Manager().Status(r.Context()))
}

// metrics exposes the pools' state to Prometheus, through Caddy's metrics
// (the admin API's /metrics, or the `metrics` handler), read when scraped.
type metrics struct{ app *App }

var (
	metricWaiting = prometheus.NewDesc("comfyume_pool_waiting_jobs",
		"Jobs waiting in the pool's queue (of every gateway when the queue is shared).", []string{"pool"}, nil)
	metricHeld = prometheus.NewDesc("comfyume_pool_held_jobs",
		"This gateway's jobs waiting out a retry because no endpoint accepted them (cold start).", []string{"pool"}, nil)
	metricRunning = prometheus.NewDesc("comfyume_pool_running_jobs",
		"This gateway's jobs holding an endpoint slot.", []string{"pool"}, nil)
	metricUp = prometheus.NewDesc("comfyume_endpoint_up",
		"1 while the endpoint takes jobs, 0 while its circuit is open.", []string{"pool", "endpoint"}, nil)
	metricEndpointJobs = prometheus.NewDesc("comfyume_endpoint_jobs",
		"This gateway's jobs on the endpoint.", []string{"pool", "endpoint"}, nil)
	metricEnded = prometheus.NewDesc("comfyume_jobs_ended_total",
		"Jobs that ended on this gateway, by final status.", []string{"status"}, nil)
	metricSockets = prometheus.NewDesc("comfyume_browser_sockets",
		"Open browser WebSockets on this gateway.", nil, nil)
)

// Describe implements prometheus.Collector.
func (m metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{metricWaiting, metricHeld, metricRunning, metricUp, metricEndpointJobs, metricEnded, metricSockets} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m metrics) Collect(ch chan<- prometheus.Metric) {
	g := m.app.gateway
	if g == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, p := range g.Manager().Status(ctx) {
		ch <- prometheus.MustNewConstMetric(metricWaiting, prometheus.GaugeValue, float64(p.Waiting), p.Name)
		ch <- prometheus.MustNewConstMetric(metricHeld, prometheus.GaugeValue, float64(p.Held), p.Name)
		ch <- prometheus.MustNewConstMetric(metricRunning, prometheus.GaugeValue, float64(p.Running), p.Name)
		for _, e := range p.Endpoints {
			up := 0.0
			if e.Up {
				up = 1
			}
			ch <- prometheus.MustNewConstMetric(metricUp, prometheus.GaugeValue, up, p.Name, e.URL)
			ch <- prometheus.MustNewConstMetric(metricEndpointJobs, prometheus.GaugeValue, float64(e.Jobs), p.Name, e.URL)
		}
	}
	for status, n := range g.Manager().Ended() {
		ch <- prometheus.MustNewConstMetric(metricEnded, prometheus.CounterValue, float64(n), status)
	}
	ch <- prometheus.MustNewConstMetric(metricSockets, prometheus.GaugeValue, float64(g.Hub().Sockets()))
}

var (
	_ caddy.AdminRouter    = AdminAPI{}
	_ prometheus.Collector = metrics{}
)
