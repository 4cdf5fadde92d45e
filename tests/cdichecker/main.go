// Command cdichecker checks CDI spec directories the way a container runtime uses them, with
// the official CDI library (tags.cncf.io/container-device-interface, the code in containerd
// and CRI-O): it loads each directory into a CDI cache, treats every spec error as a failure,
// resolves the fully qualified device IDs a DRA driver returned and injects them into an OCI
// runtime spec with the library's InjectDevices, as containerd does when it creates a
// container. Device nodes are completed from the host with lstat exactly as at container
// creation, so a hostPath that is not a device node (a symlink, a plain file) is refused.
//
// Input: JSON on stdin, {"cases": [{"name": "...", "specDir": "/dir", "devices": ["v/c=n"]}]}
// (a bare list of cases is accepted too), or one case from the command line:
//
//	cdichecker -spec-dir DIR [-name NAME] DEVICE-ID...
//
// Output: one JSON document on stdout, {"ok": bool, "library": "...", "cases": [...]}, each
// case with ok, error, the spec files loaded, spec errors per file, errors per device and a
// summary of the OCI edits (env, devices, cgroup device rules, mounts). The exit code is 1
// when any case failed and 2 when the input cannot be read.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"sort"
	"strings"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	"tags.cncf.io/container-device-interface/pkg/cdi"
)

const libraryModule = "tags.cncf.io/container-device-interface"

type caseIn struct {
	Name    string   `json:"name"`
	SpecDir string   `json:"specDir"`
	Devices []string `json:"devices"`
}

type input struct {
	Cases []caseIn `json:"cases"`
}

type deviceOut struct {
	Path     string  `json:"path"`
	Type     string  `json:"type"`
	Major    int64   `json:"major"`
	Minor    int64   `json:"minor"`
	FileMode *string `json:"fileMode,omitempty"`
	UID      *uint32 `json:"uid,omitempty"`
	GID      *uint32 `json:"gid,omitempty"`
}

type ruleOut struct {
	Allow  bool   `json:"allow"`
	Type   string `json:"type"`
	Major  *int64 `json:"major,omitempty"`
	Minor  *int64 `json:"minor,omitempty"`
	Access string `json:"access"`
}

type mountOut struct {
	Destination string   `json:"destination"`
	Source      string   `json:"source"`
	Type        string   `json:"type,omitempty"`
	Options     []string `json:"options,omitempty"`
}

type editsOut struct {
	Env            []string    `json:"env"`
	Devices        []deviceOut `json:"devices"`
	DeviceRules    []ruleOut   `json:"deviceRules"`
	Mounts         []mountOut  `json:"mounts"`
	Hooks          int         `json:"hooks"`
	AdditionalGIDs []uint32    `json:"additionalGids,omitempty"`
}

type caseOut struct {
	Name         string              `json:"name"`
	SpecDir      string              `json:"specDir"`
	Devices      []string            `json:"devices"`
	OK           bool                `json:"ok"`
	Error        string              `json:"error,omitempty"`
	SpecFiles    []string            `json:"specFiles"`
	SpecErrors   map[string][]string `json:"specErrors,omitempty"`
	DeviceErrors map[string]string   `json:"deviceErrors,omitempty"`
	Edits        *editsOut           `json:"edits,omitempty"`
}

type output struct {
	OK      bool      `json:"ok"`
	Library string    `json:"library"`
	Cases   []caseOut `json:"cases"`
}

// baseSpec is the OCI spec a container gets before CDI edits, modelled on containerd's
// default Linux spec: root user, PATH, the usual /proc, /dev and /sys mounts and a cgroup
// device rule that denies everything not allowed later.
func baseSpec() *oci.Spec {
	return &oci.Spec{
		Version: oci.Version,
		Root:    &oci.Root{Path: "rootfs"},
		Process: &oci.Process{
			Cwd:  "/",
			User: oci.User{UID: 0, GID: 0},
			Env:  []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		},
		Mounts: []oci.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Linux: &oci.Linux{
			Resources: &oci.LinuxResources{
				Devices: []oci.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
			},
			Namespaces: []oci.LinuxNamespace{
				{Type: oci.PIDNamespace}, {Type: oci.IPCNamespace}, {Type: oci.UTSNamespace},
				{Type: oci.MountNamespace}, {Type: oci.NetworkNamespace},
			},
		},
	}
}

func libraryVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == libraryModule {
				return dep.Path + " " + dep.Version
			}
		}
	}
	return libraryModule
}

// inject injects devices into a fresh base spec with the cache, as containerd does.
func inject(cache *cdi.Cache, devices []string) (*oci.Spec, error) {
	spec := baseSpec()
	if _, err := cache.InjectDevices(spec, devices...); err != nil {
		return nil, err
	}
	return spec, nil
}

func summarize(spec *oci.Spec) *editsOut {
	base := baseSpec()
	out := &editsOut{Env: []string{}, Devices: []deviceOut{}, DeviceRules: []ruleOut{}, Mounts: []mountOut{}}
	for _, e := range spec.Process.Env {
		if !slices.Contains(base.Process.Env, e) {
			out.Env = append(out.Env, e)
		}
	}
	if spec.Linux != nil {
		for _, d := range spec.Linux.Devices {
			dev := deviceOut{Path: d.Path, Type: d.Type, Major: d.Major, Minor: d.Minor, UID: d.UID, GID: d.GID}
			if d.FileMode != nil {
				mode := fmt.Sprintf("%#o", uint32(*d.FileMode))
				dev.FileMode = &mode
			}
			out.Devices = append(out.Devices, dev)
		}
		if r := spec.Linux.Resources; r != nil && len(r.Devices) >= len(base.Linux.Resources.Devices) {
			for _, r := range r.Devices[len(base.Linux.Resources.Devices):] {
				out.DeviceRules = append(out.DeviceRules, ruleOut{Allow: r.Allow, Type: r.Type, Major: r.Major, Minor: r.Minor, Access: r.Access})
			}
		}
	}
	for _, m := range spec.Mounts {
		isBase := slices.ContainsFunc(base.Mounts, func(b oci.Mount) bool {
			return b.Destination == m.Destination && b.Source == m.Source && b.Type == m.Type
		})
		if !isBase {
			out.Mounts = append(out.Mounts, mountOut{Destination: m.Destination, Source: m.Source, Type: m.Type, Options: m.Options})
		}
	}
	if spec.Hooks != nil {
		h := spec.Hooks
		out.Hooks = len(h.Prestart) + len(h.CreateRuntime) + len(h.CreateContainer) + len(h.StartContainer) + len(h.Poststart) + len(h.Poststop)
	}
	out.AdditionalGIDs = spec.Process.User.AdditionalGids
	return out
}

func specFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	files := []string{}
	for _, e := range entries {
		if ext := filepath.Ext(e.Name()); !e.IsDir() && (ext == ".json" || ext == ".yaml") {
			files = append(files, filepath.Join(dir, e.Name()))
		}
	}
	return files, nil
}

func check(c caseIn) caseOut {
	out := caseOut{Name: c.Name, SpecDir: c.SpecDir, Devices: c.Devices, SpecFiles: []string{}}
	if out.Devices == nil {
		out.Devices = []string{}
	}
	fail := func(format string, args ...any) caseOut {
		out.OK = false
		out.Error = fmt.Sprintf(format, args...)
		return out
	}
	if c.SpecDir == "" {
		return fail("no specDir given")
	}
	files, err := specFiles(c.SpecDir)
	if err != nil {
		return fail("CDI spec directory %s cannot be read: %v", c.SpecDir, err)
	}
	out.SpecFiles = files
	if len(files) == 0 {
		return fail("CDI spec directory %s holds no .json or .yaml spec", c.SpecDir)
	}

	cache, err := cdi.NewCache(cdi.WithSpecDirs(c.SpecDir), cdi.WithAutoRefresh(false))
	if err != nil {
		return fail("cannot create a CDI cache for %s: %v", c.SpecDir, err)
	}
	_ = cache.Refresh() // the same errors, per file, come from GetErrors
	var problems []string
	for path, errs := range cache.GetErrors() {
		for _, e := range errs {
			if out.SpecErrors == nil {
				out.SpecErrors = map[string][]string{}
			}
			out.SpecErrors[path] = append(out.SpecErrors[path], e.Error())
			problems = append(problems, fmt.Sprintf("CDI spec %s: %v", path, e))
		}
	}
	sort.Strings(problems)

	spec, err := inject(cache, c.Devices)
	if err != nil {
		// Inject each device alone to say which one the runtime refuses.
		out.DeviceErrors = map[string]string{}
		for _, d := range c.Devices {
			if _, derr := inject(cache, []string{d}); derr != nil {
				out.DeviceErrors[d] = derr.Error()
				problems = append(problems, fmt.Sprintf("device %s: %v", d, derr))
			}
		}
		if len(out.DeviceErrors) == 0 {
			problems = append(problems, fmt.Sprintf("devices %s together: %v", strings.Join(c.Devices, ", "), err))
		}
	} else {
		out.Edits = summarize(spec)
	}
	if len(problems) > 0 {
		return fail("%s", strings.Join(problems, "; "))
	}
	out.OK = true
	return out
}

func readInput(stdin io.Reader) ([]caseIn, error) {
	data, err := io.ReadAll(stdin)
	if err != nil {
		return nil, fmt.Errorf("reading stdin: %w", err)
	}
	trimmed := strings.TrimSpace(string(data))
	if trimmed == "" {
		return nil, errors.New("no input: give JSON cases on stdin or -spec-dir DIR DEVICE-ID...")
	}
	dec := func(v any) error {
		d := json.NewDecoder(strings.NewReader(trimmed))
		d.DisallowUnknownFields()
		return d.Decode(v)
	}
	if strings.HasPrefix(trimmed, "[") {
		var cases []caseIn
		if err := dec(&cases); err != nil {
			return nil, fmt.Errorf("stdin is not a JSON list of cases: %w", err)
		}
		return cases, nil
	}
	var in input
	if err := dec(&in); err != nil {
		return nil, fmt.Errorf(`stdin is not {"cases": [...]}: %w`, err)
	}
	return in.Cases, nil
}

func main() {
	specDir := flag.String("spec-dir", "", "check one case: this CDI spec directory with the device IDs given as arguments (otherwise cases are read as JSON from stdin)")
	name := flag.String("name", "", "the name of the case given with -spec-dir")
	flag.Parse()

	var cases []caseIn
	if *specDir != "" {
		cases = []caseIn{{Name: *name, SpecDir: *specDir, Devices: flag.Args()}}
	} else {
		var err error
		if cases, err = readInput(os.Stdin); err != nil {
			fmt.Fprintf(os.Stderr, "cdichecker: %v\n", err)
			os.Exit(2)
		}
	}

	result := output{OK: true, Library: libraryVersion(), Cases: []caseOut{}}
	for _, c := range cases {
		out := check(c)
		if !out.OK {
			result.OK = false
			label := out.Name
			if label == "" {
				label = out.SpecDir
			}
			fmt.Fprintf(os.Stderr, "cdichecker: %s: %s\n", label, out.Error)
		}
		result.Cases = append(result.Cases, out)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(result); err != nil {
		fmt.Fprintf(os.Stderr, "cdichecker: writing the result: %v\n", err)
		os.Exit(2)
	}
	if !result.OK {
		os.Exit(1)
	}
}
