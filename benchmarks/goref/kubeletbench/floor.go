package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// floor is the least a prepare can cost: one read of the claim from the API server, the claim's
// CDI spec written (temp file and rename, as the CDI library writes it) and a checkpoint
// record written durably (temp file, fsync, rename, fsync of the directory). Unprepare:
// remove the spec, write the checkpoint. Reads run concurrently; the file writes are
// serialized, as a driver must serialize them.
type floor struct {
	client kubernetes.Interface
	dir    string

	mu     sync.Mutex
	claims map[string]floorRecord
	bytes  int
}

type floorRecord struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Pool      string `json:"pool"`
	Device    string `json:"device"`
	CDI       string `json:"cdi"`
}

func newFloor(kubeconfig, dir string, qps float64, burst int) (*floor, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg.QPS, cfg.Burst = float32(qps), burst
	cfg.UserAgent = "kubeletbench-floor"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	for _, sub := range []string{"cdi", "state"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return nil, err
		}
	}
	return &floor{client: client, dir: dir, claims: map[string]floorRecord{}}, nil
}

func (f *floor) size() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bytes
}

func (f *floor) specPath(uid string) string {
	return filepath.Join(f.dir, "cdi", "floor_"+uid+".json")
}

func (f *floor) prepare(claims []claim) []string {
	var errs []string
	for _, c := range claims {
		if err := f.prepareOne(c); err != nil {
			errs = append(errs, c.Name+": "+err.Error())
		}
	}
	return errs
}

func (f *floor) prepareOne(c claim) error {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	obj, err := f.client.ResourceV1().ResourceClaims(c.Namespace).Get(ctx, c.Name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if string(obj.UID) != c.UID || obj.Status.Allocation == nil || len(obj.Status.Allocation.Devices.Results) == 0 {
		return errors.New("not the allocated claim asked for")
	}
	r := obj.Status.Allocation.Devices.Results[0]
	id := "dra-core.dev/floor=" + c.UID + "-" + r.Device
	spec, err := json.Marshal(map[string]any{
		"cdiVersion": "0.3.0",
		"kind":       "dra-core.dev/floor",
		"devices": []any{map[string]any{
			"name":           c.UID + "-" + r.Device,
			"containerEdits": map[string]any{"env": []string{"DRA_FAKE_CLAIM=" + c.Namespace + "/" + c.Name, "DRA_FAKE_DEVICES=" + r.Device}},
		}},
	})
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := writeRenamed(f.specPath(c.UID), spec); err != nil {
		return err
	}
	f.claims[c.UID] = floorRecord{c.Namespace, c.Name, r.Pool, r.Device, id}
	return f.save()
}

func (f *floor) unprepare(claims []claim) []string {
	var errs []string
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range claims {
		if err := os.Remove(f.specPath(c.UID)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, c.Name+": "+err.Error())
			continue
		}
		delete(f.claims, c.UID)
		if err := f.save(); err != nil {
			errs = append(errs, c.Name+": "+err.Error())
		}
	}
	return errs
}

func (f *floor) save() error {
	data, err := json.Marshal(f.claims)
	if err != nil {
		return err
	}
	path := filepath.Join(f.dir, "state", "checkpoint.json")
	tmp, err := os.CreateTemp(filepath.Dir(path), ".checkpoint.*")
	if err != nil {
		return err
	}
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if closeErr := tmp.Close(); err == nil {
		err = closeErr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("checkpoint: %w", err)
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	f.bytes = len(data)
	return d.Sync()
}

func writeRenamed(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".spec.*")
	if err != nil {
		return err
	}
	_, err = tmp.Write(data)
	if closeErr := tmp.Close(); err == nil {
		err = closeErr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		_ = os.Remove(tmp.Name())
	}
	return err
}
