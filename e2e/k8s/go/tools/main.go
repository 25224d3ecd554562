// Command k8s-tools holds the small helpers of the e2e/k8s test cluster:
//
//	k8s-tools relay LISTEN TARGET      forward connections; each side is tcp:HOST:PORT or unix:PATH
//	k8s-tools oci NAME OUT.tar [--entrypoint a,b] [--cmd a,b] [--env K=V]... SRC[:DEST]...
//	                                   write an OCI image layout tarball (for ctr images import)
//	k8s-tools pause                    the pod sandbox process (exits 0 on SIGINT/SIGTERM, reaps children)
//	k8s-tools serve ADDR DIR           image depot for the nodes: GET /list ("SHA256 NAME" per *.tar in DIR),
//	                                   GET /f/NAME, POST /done?node=N&sha=S (records DIR/.done/N/S)
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if filepath.Base(os.Args[0]) == "pause" { // the entrypoint of the pause image
		pause()
	}
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "relay":
		if len(os.Args) != 4 {
			usage()
		}
		relay(os.Args[2], os.Args[3])
	case "oci":
		if err := oci(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "k8s-tools oci:", err)
			os.Exit(1)
		}
	case "pause":
		pause()
	case "serve":
		if len(os.Args) != 4 {
			usage()
		}
		serve(os.Args[2], os.Args[3])
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: k8s-tools relay LISTEN TARGET | oci NAME OUT.tar [opts] SRC[:DEST]... | pause")
	os.Exit(2)
}

func split(a string) (string, string) {
	if p, rest, ok := strings.Cut(a, ":"); ok && (p == "tcp" || p == "unix") {
		return p, rest
	}
	return "tcp", a
}

func relay(listen, target string) {
	ln, la := split(listen)
	if ln == "unix" {
		os.Remove(la)
	}
	l, err := net.Listen(ln, la)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		os.Exit(1)
	}
	tn, ta := split(target)
	for {
		c, err := l.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "relay accept:", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go func(c net.Conn) {
			defer c.Close()
			d, err := net.DialTimeout(tn, ta, 10*time.Second)
			if err != nil {
				return
			}
			defer d.Close()
			done := make(chan struct{}, 2)
			cp := func(dst, src net.Conn) {
				io.Copy(dst, src)
				if cw, ok := dst.(interface{ CloseWrite() error }); ok {
					cw.CloseWrite()
				}
				done <- struct{}{}
			}
			go cp(d, c)
			go cp(c, d)
			<-done
			<-done
		}(c)
	}
}

func pause() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}

type blob struct {
	MediaType string            `json:"mediaType"`
	Digest    string            `json:"digest"`
	Size      int64             `json:"size"`
	Annot     map[string]string `json:"annotations,omitempty"`
}

func digest(b []byte) string { s := sha256.Sum256(b); return "sha256:" + hex.EncodeToString(s[:]) }

// oci NAME OUT [--entrypoint a,b] [--cmd a,b] [--env K=V] [--workdir D] SRC[:DEST]...
// Each SRC (file, directory or symlink) is put into the single layer at DEST (default: SRC's
// own absolute path). Symlinks are kept; owners are root; mtimes are zero (reproducible).
func oci(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("need NAME and OUT")
	}
	name, out := args[0], args[1]
	var entry, cmd, env []string
	workdir := "/"
	var srcs []string
	for i := 2; i < len(args); i++ {
		switch args[i] {
		case "--entrypoint", "--cmd", "--env", "--workdir":
			if i+1 >= len(args) {
				return fmt.Errorf("%s needs a value", args[i])
			}
			v := args[i+1]
			switch args[i] {
			case "--entrypoint":
				entry = strings.Split(v, ",")
			case "--cmd":
				cmd = strings.Split(v, ",")
			case "--env":
				env = append(env, v)
			case "--workdir":
				workdir = v
			}
			i++
		default:
			srcs = append(srcs, args[i])
		}
	}
	if len(env) == 0 {
		env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	// layer
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	seen := map[string]bool{}
	addDirs := func(p string) error {
		parts := strings.Split(strings.Trim(filepath.Dir(p), "/"), "/")
		cur := ""
		for _, q := range parts {
			if q == "" || q == "." {
				continue
			}
			cur += q + "/"
			if !seen[cur] {
				seen[cur] = true
				if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: cur, Mode: 0755, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}); err != nil {
					return err
				}
			}
		}
		return nil
	}
	add := func(src, dest string) error {
		fi, err := os.Lstat(src)
		if err != nil {
			return err
		}
		name := strings.TrimPrefix(dest, "/")
		if err := addDirs(name); err != nil {
			return err
		}
		h := &tar.Header{Name: name, Mode: int64(fi.Mode().Perm()), ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(src)
			if err != nil {
				return err
			}
			h.Typeflag, h.Linkname = tar.TypeSymlink, t
		case fi.IsDir():
			h.Typeflag, h.Name = tar.TypeDir, name+"/"
			if seen[h.Name] {
				return nil
			}
			seen[h.Name] = true
		default:
			h.Typeflag, h.Size = tar.TypeReg, fi.Size()
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if h.Typeflag == tar.TypeReg {
			f, err := os.Open(src)
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err := io.Copy(tw, f); err != nil {
				return err
			}
		}
		return nil
	}
	for _, s := range srcs {
		src, dest, ok := strings.Cut(s, ":")
		if !ok {
			dest = src
		}
		fi, err := os.Lstat(src)
		if err != nil {
			return err
		}
		if fi.IsDir() {
			var paths []string
			filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
				if err == nil {
					paths = append(paths, p)
				}
				return err
			})
			sort.Strings(paths)
			for _, p := range paths {
				rel, _ := filepath.Rel(src, p)
				if err := add(p, filepath.Join(dest, rel)); err != nil {
					return err
				}
			}
		} else if err := add(src, dest); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	zw.Write(raw.Bytes())
	zw.Close()
	layer := gz.Bytes()
	config, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
		"config": map[string]any{"Entrypoint": entry, "Cmd": cmd, "Env": env, "WorkingDir": workdir},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{digest(raw.Bytes())}},
	})
	manifest, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": blob{MediaType: "application/vnd.oci.image.config.v1+json", Digest: digest(config), Size: int64(len(config))},
		"layers": []blob{{MediaType: "application/vnd.oci.image.layer.v1.tar+gzip", Digest: digest(layer), Size: int64(len(layer))}},
	})
	tag := "latest"
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		tag = name[i+1:]
	}
	index, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
		"manifests": []blob{{MediaType: "application/vnd.oci.image.manifest.v1+json", Digest: digest(manifest), Size: int64(len(manifest)),
			Annot: map[string]string{"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag}}},
	})
	f, err := os.Create(out + ".tmp")
	if err != nil {
		return err
	}
	ow := tar.NewWriter(f)
	put := func(n string, b []byte) {
		ow.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Size: int64(len(b)), Mode: 0644, ModTime: time.Unix(0, 0)})
		ow.Write(b)
	}
	put("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`))
	put("index.json", index)
	for _, b := range [][]byte{config, manifest, layer} {
		put("blobs/sha256/"+strings.TrimPrefix(digest(b), "sha256:"), b)
	}
	if err := ow.Close(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(out+".tmp", out)
}

func serve(addr, dir string) {
	type sum struct {
		size int64
		mod  time.Time
		sha  string
	}
	var mu sync.Mutex
	sums := map[string]sum{}
	mux := http.NewServeMux()
	mux.HandleFunc("/list", func(w http.ResponseWriter, r *http.Request) {
		ents, _ := os.ReadDir(dir)
		mu.Lock()
		defer mu.Unlock()
		for _, e := range ents {
			n := e.Name()
			if !strings.HasSuffix(n, ".tar") || e.IsDir() {
				continue
			}
			fi, err := e.Info()
			if err != nil {
				continue
			}
			s, ok := sums[n]
			if !ok || s.size != fi.Size() || !s.mod.Equal(fi.ModTime()) {
				f, err := os.Open(filepath.Join(dir, n))
				if err != nil {
					continue
				}
				h := sha256.New()
				io.Copy(h, f)
				f.Close()
				s = sum{fi.Size(), fi.ModTime(), hex.EncodeToString(h.Sum(nil))}
				sums[n] = s
			}
			fmt.Fprintf(w, "%s %s\n", s.sha, n)
		}
	})
	mux.Handle("/f/", http.StripPrefix("/f/", http.FileServer(http.Dir(dir))))
	mux.HandleFunc("/done", func(w http.ResponseWriter, r *http.Request) {
		node, sha := filepath.Base(r.URL.Query().Get("node")), filepath.Base(r.URL.Query().Get("sha"))
		if node == "." || sha == "." || node == "/" || sha == "/" {
			http.Error(w, "need node and sha", 400)
			return
		}
		d := filepath.Join(dir, ".done", node)
		os.MkdirAll(d, 0755)
		os.WriteFile(filepath.Join(d, sha), nil, 0644)
	})
	if err := http.ListenAndServe(addr, mux); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}
