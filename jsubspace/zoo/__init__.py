"""Model zoos trained in JAX/Flax on real bundled data: the populations of the experiments."""

from jsubspace.zoo._data import FASHION_DIR
from jsubspace.zoo._data import TRANSFORMS
from jsubspace.zoo._data import Dataset
from jsubspace.zoo._data import Task
from jsubspace.zoo._data import apply_task
from jsubspace.zoo._data import load_digits
from jsubspace.zoo._data import load_fashion_mnist
from jsubspace.zoo._models import ARCHITECTURES
from jsubspace.zoo._models import CNN
from jsubspace.zoo._models import MLP
from jsubspace.zoo._models import ViT
from jsubspace.zoo._report import index_html
from jsubspace.zoo._report import plot_function
from jsubspace.zoo._standard import ZooConfig
from jsubspace.zoo._standard import load_tasks
from jsubspace.zoo._standard import make_tasks
from jsubspace.zoo._standard import standard_zoos
from jsubspace.zoo._train import accuracy
from jsubspace.zoo._train import flatten
from jsubspace.zoo._train import init_zoo
from jsubspace.zoo._train import lora_accuracy
from jsubspace.zoo._train import lora_init
from jsubspace.zoo._train import task_data
from jsubspace.zoo._train import train_lora_zoo
from jsubspace.zoo._train import train_zoo
from jsubspace.zoo._train import unflatten
from jsubspace.zoo._train import write_lora_zoo
from jsubspace.zoo._train import write_zoo

__all__ = [
    "ARCHITECTURES",
    "CNN",
    "FASHION_DIR",
    "MLP",
    "TRANSFORMS",
    "Dataset",
    "Task",
    "ViT",
    "ZooConfig",
    "accuracy",
    "apply_task",
    "flatten",
    "index_html",
    "init_zoo",
    "load_digits",
    "load_fashion_mnist",
    "load_tasks",
    "lora_accuracy",
    "lora_init",
    "make_tasks",
    "plot_function",
    "standard_zoos",
    "task_data",
    "train_lora_zoo",
    "train_zoo",
    "unflatten",
    "write_lora_zoo",
    "write_zoo",
]
