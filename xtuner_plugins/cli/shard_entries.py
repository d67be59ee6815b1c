"""What goes into a shard: one sample of the data set as a shard entry (its record as JSON, its images' or its
video's bytes, each file checked as training reads it) and one shard's tar file, written under a temporary name and
recorded with its samples, bytes and digest. ``shard_dataset.py`` plans the shards and writes them with these.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Union

from xtuner_plugins.data.errors import SampleError
from xtuner_plugins.data.shard_index import media_update


class Shard:
    """One planned shard, written under a temporary name (``NAME.tar.part``, renamed in order by
    ``shard_dataset.write_shards``), and recorded with its samples, bytes and ``digest``, of its samples' records in
    order (a set written again with another ``--seed`` has the same counts and, tar padding, the same bytes: a
    resume checks what the shards hold). The tar members carry ``mtime``, a whole second: webdataset's own default,
    the time as a float, made a PAX header block of every member (two more 512-byte blocks a file, and a quarter of
    the writing time)."""

    def __init__(self, out: str, name: str, mtime: int):
        self.out, self.name, self.mtime = out, name, mtime
        self.writer, self.samples, self.hash, self.first = None, 0, hashlib.sha1(), None
        self.media = hashlib.sha1()   # of its images', videos' and frames' bytes (data/shard_index.media_update)

    def write(self, sample: dict) -> None:
        from webdataset import TarWriter
        if self.writer is None:
            self.writer = TarWriter(os.path.join(self.out, self.name), encoder=False, mtime=self.mtime)
        self.writer.write(sample)
        self.hash.update(sample['json'] + b'\n')
        media_update(self.media, sample)
        if self.first is None:   # the first sample's record alone: checked before any sample of the shard is used
            self.first = hashlib.sha1(sample['json'] + b'\n').hexdigest()[:16]
        self.samples += 1

    def close(self) -> Optional[dict]:
        """The shard's record; None when no sample was written (every one skipped)."""
        if self.writer is None:
            return None
        self.writer.close()
        self.writer = None
        return dict(file=self.name, samples=self.samples, bytes=os.path.getsize(os.path.join(self.out, self.name)),
                    digest=self.hash.hexdigest()[:16], first=self.first, media=self.media.hexdigest()[:16])

    def abort(self) -> None:
        """Close the shard being written after an error (a full disk), each failure of the closing swallowed:
        left to the garbage collector, the tar stream and its file each printed ``Exception ignored ... No space
        left on device`` under the tool's one line."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        for close in (writer.close, writer.own_fileobj.close if writer.own_fileobj is not None else None):
            try:
                if close is not None:
                    close()
            except OSError:
                pass


def media_bytes(path: str, what: str, where: str, read: bool = True) -> Union[bytes, int]:
    """An image's or a video's file's bytes (``read=False``: its size, once the file is opened for reading);
    ``missing_image`` / ``missing_video`` naming ``where`` when there are none, ``corrupt_image`` /
    ``corrupt_video`` when the file is there but cannot be read (no read permission, an I/O error), as training,
    check_dataset and eval name it (``data/image_io.py``)."""
    from xtuner_plugins.data.image_io import why_missing
    if not os.path.isfile(path):
        raise SampleError(f'missing_{what}', why_missing(path, f'{what} file' if what == 'image' else what), where)
    try:
        with open(path, 'rb') as f:
            return f.read() if read else os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise SampleError(f'corrupt_{what}', f'{what} file cannot be read: {exc}', where) from None


def shard_sample(ds, i: int, read: bool = True) -> dict:
    """The shard entry of the data set's sample ``i``: its record as JSON and its images' (or video's) bytes
    (``read=False``: their sizes, the files found readable); :class:`SampleError` when the data set would skip it
    now."""
    from xtuner_plugins.data.image_io import read_image_size
    record = ds.record_at(i)
    where = ds.where(record)
    sample, names, video, frames = {'__key__': f'{i:09d}'}, [], None, []
    try:   # the check again: a file changed since the start-up check read it (cached) is a skip, counted
        checked = ds.check_record(record)
        if checked.video is not None and os.path.isdir(checked.video):  # a frame folder: its frames, in order
            for k, path in enumerate(ds.probe(checked).frames):
                frames.append(f'frame{k:04d}{os.path.splitext(path)[1].lower()}')
                sample[frames[-1]] = media_bytes(path, 'video', where, read)
                read_image_size(sample[frames[-1]] if read else path, ds.max_image_pixels, path)   # as an image's
        elif checked.video is not None:
            video = 'video' + os.path.splitext(checked.video)[1].lower()
            sample[video] = media_bytes(checked.video, 'video', where, read)
            if not read:   # a video, as training reads it (its container's header)
                ds.probe(checked)
        for j, path in enumerate(checked.image_paths):
            names.append(f'img{j}{os.path.splitext(path)[1].lower()}')
            sample[names[-1]] = media_bytes(path, 'image', where, read)
            # an image, as training reads it (its header): any other file a sample names (a key, /etc/passwd) was
            # packed whole into the shards a user then shares
            read_image_size(sample[names[-1]] if read else path, ds.max_image_pixels, path)
    except SampleError as err:
        raise (err if err.source else err.with_source(where)) from None
    sample['json'] = json.dumps(dict(sample=checked.sample, source=record.source, line=record.line,
                                     images=names, **(dict(video=video) if video else {}),
                                     **(dict(frames=frames) if frames else {})),
                                ensure_ascii=False).encode('utf-8')
    return sample
