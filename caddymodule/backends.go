package caddymodule

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/valkey-io/valkey-go"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/relay"
	"github.com/comfyume/comfyume/usage"
)

// valkeyStartWait is how long Caddy's start waits for Valkey to answer
// (containers started together: Valkey may come up a moment later).
const valkeyStartWait = 10 * time.Second

// connectValkey makes the client, retrying while Valkey does not answer
// for up to wait. Once made, the client reconnects by itself: a Valkey that
// goes away later only makes prompts answer 503 until it is back.
func connectValkey(opt valkey.ClientOption, wait time.Duration, logger *zap.Logger) (valkey.Client, error) {
	deadline := time.Now().Add(wait)
	backoff := 100 * time.Millisecond
	for logged := false; ; {
		client, err := valkey.NewClient(opt)
		if err == nil {
			return client, nil
		}
		if time.Now().Add(backoff).After(deadline) {
			return nil, err
		}
		if !logged {
			logger.Warn("Valkey does not answer yet; waiting for it", zap.Duration("up_to", wait), zap.Error(err))
			logged = true
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, time.Second)
	}
}

// newGateway builds the gateway with the configured store and outputs.
func newGateway(_ caddy.Context, st StoreConfig, out OutputsConfig, health time.Duration, logger *zap.Logger) (caddy.Destructor, error) {
	var closers []func()
	fail := func(err error) (caddy.Destructor, error) {
		for _, c := range closers {
			c()
		}
		return nil, err
	}
	cfg := relay.Config{Logger: logger, LeaseTTL: time.Duration(st.LeaseTTL), HealthInterval: health}
	var ledger usage.Ledger = usage.NewMemoryLedger()

	switch st.Backend {
	case "valkey":
		opt, err := valkeyOptions(st)
		if err != nil {
			return fail(err)
		}
		client, err := connectValkey(opt, valkeyStartWait, logger)
		if err != nil {
			return fail(fmt.Errorf("store valkey %s: %w", st.Address, err))
		}
		closers = append(closers, client.Close)
		cfg.Store = dispatch.NewValkeyStore(client, st.Prefix)
		cfg.Bus = relay.NewValkeyBus(client, st.Prefix)
		ledger = usage.NewValkeyLedger(client, st.Prefix)
	default:
		cfg.Store = dispatch.NewMemoryStore()
	}

	switch out.Backend {
	case "s3":
		endpoint, secure := splitEndpoint(out.Endpoint)
		publicEndpoint, publicSecure := splitEndpoint(out.PublicEndpoint)
		s3, err := relay.NewS3Blobs(context.Background(), relay.S3Options{
			Endpoint: endpoint, Secure: secure,
			Bucket: out.Bucket, Prefix: out.Prefix, Region: out.Region,
			AccessKey: out.AccessKey, SecretKey: out.SecretKey,
			PublicEndpoint: publicEndpoint, PublicSecure: publicSecure,
		})
		if err != nil {
			return fail(fmt.Errorf("outputs s3: %w", err))
		}
		spool, err := relay.NewSpool(s3, out.Spool, logger.Named("spool"))
		if err != nil {
			return fail(fmt.Errorf("outputs s3 spool: %w", err))
		}
		closers = append(closers, func() { _ = spool.Close() })
		cfg.Blobs = spool
		if out.Serve == "redirect" {
			cfg.RedirectExpiry = time.Duration(out.RedirectExpiry)
			if cfg.RedirectExpiry <= 0 {
				cfg.RedirectExpiry = 15 * time.Minute
			}
		}
	default:
		blobs, err := relay.NewDiskBlobs(out.Dir)
		if err != nil {
			return fail(fmt.Errorf("outputs directory: %w", err))
		}
		cfg.Blobs = blobs
	}

	gw, err := relay.New(cfg)
	if err != nil {
		return fail(err)
	}
	gw.Manager().SetUsage(ledger)
	return gatewayHolder{Gateway: gw, closers: closers}, nil
}

// valkeyOptions turns the store config into client options.
func valkeyOptions(st StoreConfig) (valkey.ClientOption, error) {
	var opt valkey.ClientOption
	if strings.Contains(st.Address, "://") {
		var err error
		opt, err = valkey.ParseURL(st.Address)
		if err != nil {
			return opt, fmt.Errorf("store valkey address: %w", err)
		}
	} else {
		opt.InitAddress = []string{st.Address}
	}
	if st.Username != "" {
		opt.Username = st.Username
	}
	if st.Password != "" {
		opt.Password = st.Password
	}
	if st.TLS && opt.TLSConfig == nil {
		host := opt.InitAddress[0]
		if h, _, ok := strings.Cut(host, ":"); ok {
			host = h
		}
		opt.TLSConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	opt.DisableCache = st.DisableCache
	// Connect lazily-tolerant: a dead server makes commands fail (and
	// POST /prompt answer 503), not Caddy refuse to start.
	opt.ForceSingleClient = true
	// Reads fail at once while the server is down (instead of retrying
	// until their deadline), so the gateway degrades without stalling.
	opt.DisableRetry = true
	opt.Dialer.Timeout = 5 * time.Second
	return opt, nil
}

// splitEndpoint reads "host:port" (HTTPS) or "http(s)://host:port".
func splitEndpoint(e string) (string, bool) {
	if e == "" {
		return "", false
	}
	if u, err := url.Parse(e); err == nil && (u.Scheme == "http" || u.Scheme == "https") {
		return u.Host, u.Scheme == "https"
	}
	return e, true
}
