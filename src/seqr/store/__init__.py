"""The library on disk: LoraLibrary, its format, atomic writes and locks, peft in/out."""
