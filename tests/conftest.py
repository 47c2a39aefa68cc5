"Markers shared by the test suite: `cuda` tests (mirroring the notebooks' `#| cuda` cells) run only where CUDA is."
import torch

def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; deselected on machines without one")
    config.addinivalue_line("markers", "slow: long-running; mirrors the notebooks' `#| slow` cells")

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available(): return
    gpu = [i for i in items if i.get_closest_marker("cuda")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [i for i in items if not i.get_closest_marker("cuda")]
