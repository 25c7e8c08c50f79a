package dispatch

import (
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"
)

// A real net/http error toward a GPU server (URL with a token, address)
// is shown with the pool's name only.
func TestPublicMessageHidesAddresses(t *testing.T) {
	c := &http.Client{Timeout: 2 * time.Second}
	_, err := c.Get("http://user:pw@127.0.0.1:1/deploy-s3cret/prompt?token=s3cret")
	if err == nil {
		t.Skip("something listens on port 1")
	}
	for _, e := range []error{err, errors.New("dial tcp: lookup gpu-7.internal on 10.0.0.2:53: no such host"),
		errors.New("read tcp 10.1.2.3:40000->10.0.0.5:8188: connection reset by peer")} {
		got := PublicMessage("gpu", "Lost the connection: "+e.Error())
		for _, leak := range []string{"127.0.0.1", "s3cret", "user", "gpu-7", "10.0.0", "10.1.2.3", "8188"} {
			if strings.Contains(got, leak) {
				t.Errorf("%q shows %q", got, leak)
			}
		}
		if !strings.HasPrefix(got, "Lost the connection: ") {
			t.Errorf("message lost its meaning: %q", got)
		}
	}
}
