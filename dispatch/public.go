package dispatch

import (
	"regexp"
	"strings"
)

// GPU servers' addresses are internal: they may carry tokens in their
// path or query, or name hosts users should not learn. Messages shown to
// users (execution_error, status notes) name the pool instead; the logs
// keep the addresses.

var (
	// anyURL is a URL in an error text (net/http quotes the request URL).
	anyURL = regexp.MustCompile(`[A-Za-z][A-Za-z0-9+.\-]*://[^\s"'<>]*`)
	// netAddr is a socket address in a net.OpError text: "dial tcp
	// 10.0.0.5:8188", "read tcp 127.0.0.1:1->10.0.0.5:8188".
	netAddr = regexp.MustCompile(`\b(tcp|udp)[46]? [^\s]*:[0-9]+(->[^\s]*:[0-9]+)?`)
	// dnsLookup is a resolver error's "lookup <host> on <server>".
	dnsLookup = regexp.MustCompile(`\blookup [^\s:]+( on [^\s]+)?`)
)

// PublicMessage is msg with every URL and network address it contains
// replaced by the name of the pool whose server it was ("pool gpu").
func PublicMessage(pool, msg string) string {
	name := "the GPU server"
	if pool != "" {
		name = "pool " + pool
	}
	msg = anyURL.ReplaceAllString(msg, name)
	msg = netAddr.ReplaceAllString(msg, "$1")
	msg = dnsLookup.ReplaceAllString(msg, "lookup")
	return strings.TrimSpace(msg)
}
