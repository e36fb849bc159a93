"""Energy and spike accounting of spiking UNets against their ANN, measured on real forward passes."""
