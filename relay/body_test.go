package relay

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"testing/iotest"
)

// A body of announced length is read whole, byte for byte, however the
// bytes come; one that ends early is an unexpected EOF.
func TestReadAnnounced(t *testing.T) {
	want := make([]byte, 5<<20+123)
	for i := range want {
		want[i] = byte(rand.IntN(256))
	}
	for name, r := range map[string]io.Reader{
		"whole":      bytes.NewReader(want),
		"by halves":  iotest.HalfReader(bytes.NewReader(want)),
		"data + EOF": iotest.DataErrReader(bytes.NewReader(want)),
	} {
		got, err := readAnnounced(r, int64(len(want)))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: %d bytes, %v", name, len(got), err)
		}
	}
	if _, err := readAnnounced(bytes.NewReader(want[:3<<20]), int64(len(want))); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("a short body: %v", err)
	}
}
