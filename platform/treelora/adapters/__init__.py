"""Layer-wise LoRA adapters on pretrained backbones, and their export as standard PEFT folders."""

from .backbone import Backbone, ModelNotAvailable, load_backbone, tiny_backbone
from .export import load_adapter_folder, restore_adapter_folder, save_adapter_folder
from .model import ContinualModel, LoraModule

__all__ = ["Backbone", "ContinualModel", "LoraModule", "ModelNotAvailable", "load_adapter_folder", "load_backbone",
           "restore_adapter_folder", "save_adapter_folder", "tiny_backbone"]
