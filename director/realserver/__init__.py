"""The real-server side: VIPs, sysctls and tunnels on a real server (glb realserver), and the decapsulator."""
