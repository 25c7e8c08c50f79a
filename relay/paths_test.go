package relay

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/comfyume/comfyume/comfy"
)

// confined checks what a blob key promises for a ref that names a captured
// output: either it is refused, or its key starts with its job's folder,
// has no "..", "." or empty name in it, and maps back to the same ref.
func confined(t *testing.T, ref comfy.FileRef) {
	t.Helper()
	key, jobID, ok := blobKey(ref)
	if !ok {
		return
	}
	if jobID == "" || !strings.HasPrefix(key, jobID+"/") {
		t.Fatalf("%+v: key %q outside job %q", ref, key, jobID)
	}
	for _, name := range strings.Split(key, "/") {
		if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "\\\x00") {
			t.Fatalf("%+v: key %q has name %q", ref, key, name)
		}
	}
	// The key names this ref and no other.
	parts := strings.Split(key, "/")
	back := capturedRef(parts[0], comfy.FileRef{Filename: parts[len(parts)-1], Subfolder: strings.Join(parts[2:len(parts)-1], "/"), Type: parts[1]})
	if back != ref {
		t.Fatalf("%+v: key %q maps back to %+v", ref, key, back)
	}
}

// The climbing LoadImage value of issue 8 (finding 1) and its cousins are
// refused before they name a key; what is accepted stays in its job.
func TestBlobKeysStayInTheirJob(t *testing.T) {
	const bob, alice = "0b0b0b0b-0000-4000-8000-000000000000", "0a0a0a0a-0000-4000-8000-000000000000"
	for _, ref := range []comfy.FileRef{
		{Filename: "ComfyUI_00001_.png", Subfolder: "comfyume/" + bob + "/../../" + alice + "/output", Type: "output"},
		{Filename: "ComfyUI_00001_.png", Subfolder: "comfyume/" + bob + "/../" + alice, Type: "output"},
		{Filename: "..", Subfolder: "comfyume/" + bob, Type: "output"},
		{Filename: "x.png", Subfolder: "comfyume/" + bob + "/./x", Type: "output"},
		{Filename: "x.png", Subfolder: "comfyume/" + bob + "//x", Type: "output"},
		{Filename: "x.png", Subfolder: "comfyume/..", Type: "output"},
		{Filename: "x.png", Subfolder: "comfyume/" + bob + "/a\\..\\..", Type: "output"},
		{Filename: "x.png", Subfolder: "comfyume", Type: "output"},
		{Filename: "x.png", Subfolder: "comfyume/" + bob, Type: "../" + alice},
	} {
		if key, _, ok := blobKey(ref); ok {
			t.Errorf("%+v accepted as key %q", ref, key)
		}
	}
	key, job, ok := blobKey(comfy.FileRef{Filename: "a.png", Subfolder: "comfyume/" + bob + "/sub/dir", Type: "temp"})
	if !ok || job != bob || key != bob+"/temp/sub/dir/a.png" {
		t.Fatalf("plain ref: %q %q %v", key, job, ok)
	}
}

// Any file value a prompt may carry, read as a LoadImage value the way
// dispatch reads it, and any /view query, read the way serveView reads it:
// the blob key is refused or confined (see confined).
func FuzzBlobKey(f *testing.F) {
	const bob, alice = "0b0b0b0b-0000-4000-8000-000000000000", "0a0a0a0a-0000-4000-8000-000000000000"
	f.Add("comfyume/"+bob+"/../../"+alice+"/output/ComfyUI_00001_.png [output]", "filename=x.png&subfolder=comfyume/"+bob+"/../"+alice)
	f.Add("comfyume/"+bob+"/x.png [temp]", "filename=x.png&subfolder=comfyume%2F"+bob+"&type=temp")
	f.Add("comfyume/"+bob+"/a\\..\\b.png [output]", "filename=..&subfolder=comfyume")
	f.Add("comfyume//x.png [output]", "filename=x.png [output]&subfolder=comfyume/"+bob+"/%2E%2E")
	f.Fuzz(func(t *testing.T, value, query string) {
		if ref, err := comfy.ParseAnnotated(value, comfy.TypeInput); err == nil {
			confined(t, ref)
		}
		if vr, st := comfy.ParseView(comfy.ParseQuery(query)); st == 0 {
			confined(t, vr.FileRef)
		}
		// And refs as an upstream might announce them, unchecked.
		if i := strings.LastIndexByte(value, '/'); i >= 0 {
			confined(t, comfy.FileRef{Subfolder: value[:i], Filename: value[i+1:], Type: comfy.TypeOutput})
		}
	})
}

// A forgotten job's files leave every kind of blob store, and only its own:
// a job whose id starts like it keeps its files (issue 8, finding 6).
func TestRemoveJobRemovesOnlyThatJob(t *testing.T) {
	disk, err := NewDiskBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	stores := map[string]Blobs{"disk": disk}
	if os.Getenv("COMFYUME_TEST_S3_ENDPOINT") != "" || os.Getenv("CI") != "" {
		s3 := s3TestBlobs(t, s3TestOptions(t))
		stores["s3"] = s3
		primary := &flakyBlobs{Blobs: s3} // down: files wait in the spool
		sp, err := newSpool(primary, t.TempDir(), zaptest.NewLogger(t), time.Hour, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sp.Close() })
		stores["spool"] = sp
	}
	ctx := context.Background()
	for name, b := range stores {
		keys := map[string]bool{"j1/output/a.png": false, "j1/temp/sub/b.png": false, "j10/output/a.png": true, "j2/output/a.png": true}
		for key := range keys {
			if err := b.Put(ctx, key, strings.NewReader(key), BlobInfo{ContentType: "image/png"}); err != nil {
				t.Fatalf("%s: put %s: %v", name, key, err)
			}
		}
		if err := b.RemoveJob(ctx, "j1"); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for key, stays := range keys {
			f, err := b.Open(ctx, key)
			if err == nil {
				f.Close()
			}
			if stays != (err == nil) {
				t.Errorf("%s: after removing j1, %s: %v", name, key, err)
			}
		}
		for _, bad := range []string{"", "..", ".", "j1/..", "/"} {
			if err := b.RemoveJob(ctx, bad); err == nil {
				t.Errorf("%s: RemoveJob(%q) accepted", name, bad)
			}
		}
	}
}
