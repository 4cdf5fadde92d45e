package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
)

const checkpointVersion = "goref/v1"

// preparedDevice is one allocated device of a prepared claim, as answered to the kubelet.
type preparedDevice struct {
	Request      string   `json:"request"`
	Pool         string   `json:"pool"`
	Device       string   `json:"device"`
	ShareID      string   `json:"shareID,omitempty"`
	AdminAccess  bool     `json:"adminAccess,omitempty"`
	CDIDeviceIDs []string `json:"cdiDeviceIDs"`
}

// claimRecord is what the checkpoint keeps per prepared claim: enough to answer a repeated
// prepare and to undo the prepare without the claim object.
type claimRecord struct {
	Namespace string           `json:"namespace"`
	Name      string           `json:"name"`
	CDISpec   string           `json:"cdiSpec,omitempty"`
	Devices   []preparedDevice `json:"devices"`
}

// checkpointFile is the file's layout: the claims, and a CRC-32 of their encoding so that a
// damaged file is refused instead of being taken for an empty one.
type checkpointFile struct {
	Version  string          `json:"version"`
	Checksum uint32          `json:"checksum"`
	Claims   json.RawMessage `json:"claims"`
}

// checkpoint holds the prepared claims in memory and on disk. Not safe for concurrent use:
// the driver calls it under its lock.
type checkpoint struct {
	path   string
	claims map[string]claimRecord
}

func openCheckpoint(path string) (*checkpoint, error) {
	cp := &checkpoint{path: path, claims: map[string]claimRecord{}}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return cp, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read checkpoint: %w", err)
	}
	var file checkpointFile
	if err := json.Unmarshal(data, &file); err != nil {
		return nil, fmt.Errorf("checkpoint %s: %w", path, err)
	}
	if file.Version != checkpointVersion {
		return nil, fmt.Errorf("checkpoint %s: version %q, want %q", path, file.Version, checkpointVersion)
	}
	if sum := crc32.ChecksumIEEE(file.Claims); sum != file.Checksum {
		return nil, fmt.Errorf("checkpoint %s: checksum %d, content has %d", path, file.Checksum, sum)
	}
	if err := json.Unmarshal(file.Claims, &cp.claims); err != nil {
		return nil, fmt.Errorf("checkpoint %s: claims: %w", path, err)
	}
	return cp, nil
}

func (cp *checkpoint) len() int { return len(cp.claims) }

// save writes the whole checkpoint durably: temp file, fsync, rename, fsync of the directory.
func (cp *checkpoint) save() error {
	claims, err := json.Marshal(cp.claims)
	if err != nil {
		return err
	}
	data, err := json.Marshal(checkpointFile{
		Version:  checkpointVersion,
		Checksum: crc32.ChecksumIEEE(claims),
		Claims:   claims,
	})
	if err != nil {
		return err
	}
	return writeDurably(cp.path, data, 0o600)
}

func writeDurably(path string, data []byte, mode os.FileMode) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(data); err == nil {
		err = tmp.Chmod(mode)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if closeErr := tmp.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
