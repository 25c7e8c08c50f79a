package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/comfyume/comfyume/comfy"
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

// A GPU server that announces more output files than MaxOutputFiles for
// one job gets the rest refused: each was a file (or object) of its own in
// the outputs store, however small, without bound in number.
func TestOutputFilesPerJobBounded(t *testing.T) {
	dir := t.TempDir()
	blobs, err := NewDiskBlobs(dir)
	if err != nil {
		t.Fatal(err)
	}
	g, err := New(Config{Blobs: blobs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	job := "00000000-0000-4000-8000-000000000001"
	refused := 0
	for i := 0; i < MaxOutputFiles+50; i++ {
		key, _, _ := blobKey(capturedRef(job, comfy.FileRef{Filename: fmt.Sprintf("o%05d.png", i), Type: comfy.TypeOutput}))
		err := g.putOutput(context.Background(), job, key, "image/png", strings.NewReader("x"))
		var big errOutputsTooLarge
		if errors.As(err, &big) {
			refused++
		} else if err != nil {
			t.Fatal(err)
		}
	}
	files, _ := os.ReadDir(filepath.Join(dir, job, comfy.TypeOutput))
	if refused != 50 || len(files) != MaxOutputFiles {
		t.Fatalf("%d files stored, %d refused, for one job (bound %d)", len(files), refused, MaxOutputFiles)
	}
	if !strings.Contains(errOutputsTooLarge{}.Error(), "more outputs") {
		t.Fatalf("the refusal says %q", errOutputsTooLarge{}.Error())
	}
}
