package layer

import (
	"archive/tar"
	"bytes"
	"io"
	"testing"
)

func TestTarIsReproducibleAndKeepsEachKind(t *testing.T) {
	files := []File{
		{Name: "bin/", Mode: 0o755},
		{Name: "bin/tool", Mode: 0o755, Body: []byte("#!")},
		{Name: "bin/alias", Mode: 0o777, Link: "tool"},
		{Name: "empty", Mode: 0o644, Body: []byte{}},
	}
	a, err := Tar(files)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := Tar(files)
	if !bytes.Equal(a, b) {
		t.Fatal("the same files gave two different layers")
	}
	want := []struct {
		kind byte
		body string
		link string
	}{{tar.TypeDir, "", ""}, {tar.TypeReg, "#!", ""}, {tar.TypeSymlink, "", "tool"}, {tar.TypeReg, "", ""}}
	r := tar.NewReader(bytes.NewReader(a))
	for i, w := range want {
		h, err := r.Next()
		if err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		body, _ := io.ReadAll(r)
		if h.Name != files[i].Name || h.Typeflag != w.kind || string(body) != w.body || h.Linkname != w.link ||
			!h.ModTime.Equal(Epoch) || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("entry %d: %+v body %q, want %s kind %c body %q link %q at the epoch, owned by root", i, h, body, files[i].Name, w.kind, w.body, w.link)
		}
	}
	if _, err := r.Next(); err != io.EOF {
		t.Errorf("after the files: %v, want the end", err)
	}
	if _, err := New(files); err != nil {
		t.Fatal(err)
	}
}
