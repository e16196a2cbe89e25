package testbed

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	_ "crypto/sha256" // go-digest needs the hash registered
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// BusyboxImage is the name the local busybox image is imported under.
const BusyboxImage = "localhost/colo/busybox:latest"

// BusyboxMarker is a file only the busybox image has, so a test can tell
// that a container sees the image's rootfs.
const BusyboxMarker = "/etc/colo-image"

// busyboxApplets are linked to /bin/busybox in the image.
var busyboxApplets = []string{
	"sh", "cat", "echo", "env", "hostname", "id", "ls", "mkdir", "pwd",
	"readlink", "rm", "sleep", "stat", "test", "touch", "true", "false",
	"uname", "wc", "grep", "head", "ps", "kill", "dd", "sync", "ip", "ping",
	"nc", "wget", "date", "printf", "seq", "tr", "md5sum", "mount", "df", "nproc",
}

// ImportBusybox builds an OCI image from the host's static busybox
// (Debian's busybox-static) and imports it as BusyboxImage.
func (c *Containerd) ImportBusybox(ctx context.Context) error {
	return c.importImage(ctx, c.Namespace, "busybox", func(archive string) error {
		return WriteBusyboxImage(archive, BusyboxImage)
	})
}

// importImage writes an image archive with write and imports it into the
// containerd namespace ns, unpacked for the default snapshotter and for
// BlockfileSnapshotter: the latter through the client (--local), since the
// transfer service unpacks only for the snapshotters its unpack_config
// names.
func (c *Containerd) importImage(ctx context.Context, ns, name string, write func(archive string) error) error {
	archive := filepath.Join(c.Dir, name+".oci.tar")
	if err := write(archive); err != nil {
		return err
	}
	defer os.Remove(archive)
	for _, flags := range [][]string{nil, {"--local", "--snapshotter", BlockfileSnapshotter}} {
		r, err := c.ctrIn(ctx, ns, append(append([]string{"image", "import"}, flags...), archive)...)
		if err != nil {
			return err
		}
		if r.ExitCode != 0 {
			return fmt.Errorf("ctr -n %s image import %s %s: %s", ns, strings.Join(flags, " "), name, r)
		}
	}
	return nil
}

// layerFile is one entry of an image layer; dirs have a nil body.
type layerFile struct {
	hdr  tar.Header
	body []byte
}

// WriteBusyboxImage writes an OCI image-layout archive holding one layer
// with /bin/busybox, its applet links, a passwd with root and user 1000,
// and BusyboxMarker.
func WriteBusyboxImage(path, name string) error {
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return fmt.Errorf("busybox-static: %w", err)
	}
	var files []layerFile
	for _, d := range []string{"bin", "dev", "etc", "home", "home/user", "proc", "root", "sys", "tmp", "var"} {
		mode := int64(0o755)
		if d == "tmp" {
			mode = 0o1777
		}
		h := tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode}
		if d == "home/user" {
			h.Uid, h.Gid = 1000, 1000
		}
		files = append(files, layerFile{hdr: h})
	}
	for _, f := range []struct {
		name string
		mode int64
		body []byte
	}{
		{"bin/busybox", 0o755, busybox},
		{"etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n")},
		{"etc/group", 0o644, []byte("root:x:0:\nuser:x:1000:\n")},
		{BusyboxMarker[1:], 0o644, []byte("colo busybox test image\n")},
	} {
		files = append(files, layerFile{tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: f.mode}, f.body})
	}
	for _, a := range busyboxApplets {
		files = append(files, layerFile{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + a, Linkname: "busybox", Mode: 0o777}})
	}
	return writeImage(path, name, files, ocispec.ImageConfig{
		Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		Cmd: []string{"sh"},
	})
}

// writeImage writes an OCI image-layout archive of a linux/amd64 image
// with one layer holding files, named name (the annotation ctr import
// names the image by).
func writeImage(path, name string, files []layerFile, imageConfig ocispec.ImageConfig) error {
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	epoch := time.Unix(0, 0)
	for _, f := range files {
		h := f.hdr
		h.ModTime, h.Format = epoch, tar.FormatPAX
		h.Size = int64(len(f.body))
		if err := tw.WriteHeader(&h); err != nil {
			return err
		}
		if _, err := tw.Write(f.body); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	diffID := digest.FromBytes(layer.Bytes())
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz) // no name or time in the header: reproducible
	if _, err := zw.Write(layer.Bytes()); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}

	config := ocispec.Image{
		Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
		Config:   imageConfig,
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}},
	}
	type blobData struct {
		digest digest.Digest
		data   []byte
	}
	var blobs []blobData
	blob := func(mediaType string, v any) (ocispec.Descriptor, error) {
		b, ok := v.([]byte)
		if !ok {
			var err error
			if b, err = json.Marshal(v); err != nil {
				return ocispec.Descriptor{}, err
			}
		}
		d := digest.FromBytes(b)
		blobs = append(blobs, blobData{d, b})
		return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(b))}, nil
	}
	layerDesc, err := blob(ocispec.MediaTypeImageLayerGzip, gz.Bytes())
	if err != nil {
		return err
	}
	configDesc, err := blob(ocispec.MediaTypeImageConfig, config)
	if err != nil {
		return err
	}
	manifestDesc, err := blob(ocispec.MediaTypeImageManifest, ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    []ocispec.Descriptor{layerDesc},
	})
	if err != nil {
		return err
	}
	manifestDesc.Platform = &config.Platform
	manifestDesc.Annotations = map[string]string{"io.containerd.image.name": name}
	index, err := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{manifestDesc},
	})
	if err != nil {
		return err
	}

	out, err := os.Create(path)
	if err != nil {
		return err
	}
	defer out.Close()
	aw := tar.NewWriter(out)
	write := func(name string, b []byte) error {
		if err := aw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: epoch}); err != nil {
			return err
		}
		_, err := aw.Write(b)
		return err
	}
	if err := write(ocispec.ImageLayoutFile, []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return err
	}
	if err := write(ocispec.ImageIndexFile, index); err != nil {
		return err
	}
	for _, b := range blobs {
		if err := write("blobs/sha256/"+b.digest.Encoded(), b.data); err != nil {
			return err
		}
	}
	if err := aw.Close(); err != nil {
		return err
	}
	return out.Close()
}
