"""Which frames a video sample gets: InternVL 2.5's ``get_frame_indices`` (the formula restated here) and the
frame count drawn per sample."""

import numpy as np
import pytest

from xtuner_plugins.data.frame_sampling import check_sampling, draw_num_frames, frame_indices


def reference_indices(num_frames, vlen, sample, pick=None):
    """InternVL's get_frame_indices as its code and the REFERENCE notes state it (rand: ``pick(lo, hi)``)."""
    acc = min(num_frames, vlen)
    intervals = np.linspace(start=0, stop=vlen, num=acc + 1).astype(int)
    ranges = [(intervals[i], intervals[i + 1] - 1) for i in range(acc)]
    out = [(lo + hi) // 2 for lo, hi in ranges] if sample == 'middle' else [pick(lo, hi) for lo, hi in ranges]
    return out + [out[-1]] * (num_frames - len(out))


class TestSampling:

    @pytest.mark.parametrize('num_frames,vlen', [(8, 40), (8, 30), (32, 300), (5, 7), (8, 3), (1, 1)])
    def test_middle_is_the_formula(self, num_frames, vlen):
        assert frame_indices(num_frames, vlen, 'middle') == reference_indices(num_frames, vlen, 'middle')

    def test_rand_picks_in_each_interval_and_pads(self):
        rng = np.random.default_rng(0)
        for num_frames, vlen in [(8, 40), (16, 100), (8, 20)]:
            got = frame_indices(num_frames, vlen, 'rand', rng)
            lows_highs = reference_indices(num_frames, vlen, 'middle', None)  # for the count
            intervals = np.linspace(0, vlen, min(num_frames, vlen) + 1).astype(int)
            assert len(got) == len(lows_highs) == num_frames
            # one per interval, in range(lo, hi) with hi = next interval start - 1 (InternVL's range)
            assert all(intervals[i] <= g < intervals[i + 1] - 1 for i, g in enumerate(got))
        # an interval of one frame: InternVL's fallback, a sorted random subset, padded with the last
        got = frame_indices(8, 5, 'rand', np.random.default_rng(1))
        assert got[:5] == sorted(got[:5]) and len(set(got[:5])) == 5 and got[5:] == [got[4]] * 3

    def test_fps_sampling(self):
        # 4 s at 10 fps, one frame every 2 s at the middle of its span: t = 1 s, 3 s
        assert frame_indices(8, 40, 'fps0.5', input_fps=10) == [10, 30]
        assert frame_indices(8, 40, 'fps2', input_fps=10, max_num_frames=3) == [2, 8, 12]

    @pytest.mark.parametrize('sample', ['fpsinf', 'fps1e400', 'fps1e-320', 'fpsnan', 'fps', 'fps-1', 'Rand'])
    def test_a_rate_with_no_finite_frame_spacing_is_refused(self, sample):
        """fpsinf was accepted, then a ZeroDivisionError when a video was sampled; fps1e-320 an arange error."""
        with pytest.raises(ValueError, match=f"video_sampling='{sample}': unknown frame sampling"):
            check_sampling(sample)

    def test_a_huge_rate_samples_no_more_times_than_frames_asked(self):
        """fps1e9 on 4 s made an array of 4e9 seconds (30 GB) before taking max_num_frames of them; the frames
        are the same as with a lower cap."""
        assert frame_indices(8, 40, 'fps1e9', input_fps=10, max_num_frames=3) == [0, 0, 0]
        assert frame_indices(8, 40, 'fps2', input_fps=10, max_num_frames=100) == frame_indices(8, 40, 'fps2',
                                                                                                input_fps=10)
        for sample, vlen, fps in (('fps10', 40, 10), ('fps0.3', 1000, 29.97), ('fps3', 7, 1)):
            every = frame_indices(1, vlen, sample, input_fps=fps)
            for cap in (1, 2, 5, 8):  # the first cap of the uncapped frames
                assert frame_indices(1, vlen, sample, input_fps=fps, max_num_frames=cap) == every[:cap]

    def test_frame_count_is_deterministic_and_in_range(self):
        counts = [draw_num_frames(8, 32, 0, 0, line) for line in range(200)]
        assert counts == [draw_num_frames(8, 32, 0, 0, line) for line in range(200)]
        assert min(counts) == 8 and max(counts) == 32
        assert counts != [draw_num_frames(8, 32, 1, 0, line) for line in range(200)]
