// Stand-in for the CUDA header of this name in the CPU emulation (see ../emulate.py).
#pragma once
#include "cuda_emu.h"
